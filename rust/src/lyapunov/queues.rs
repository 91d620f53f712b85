//! Named virtual queues `Q_i(t+1) = max(Q_i(t) + a_i − b_i, 0)` with the quadratic Lyapunov
//! function `L = ½ Σ Q_i²`, per-step drift `L(t+1) − L(t)`, and the drift-plus-penalty score
//! `V·penalty + Σ_i Q_i·(a_i − b_i)` of candidate actions.

use super::snapshot::{Reader, Writer};
use crate::error::{CoreError, CoreResult};

const SNAPSHOT_KIND: u8 = 1;

#[derive(Debug, Clone, PartialEq)]
pub struct QueueBank {
    names: Vec<String>,
    backlog: Vec<f64>,
}

fn check_values(what: &str, values: &[f64], non_negative: bool) -> CoreResult<()> {
    for (i, &v) in values.iter().enumerate() {
        if !v.is_finite() || (non_negative && v < 0.0) {
            let need = if non_negative { "finite and >= 0" } else { "finite" };
            return Err(CoreError::InvalidArgument(format!("{what}[{i}] = {v} must be {need}")));
        }
    }
    Ok(())
}

impl QueueBank {
    pub fn new(names: Vec<String>) -> CoreResult<Self> {
        if names.is_empty() {
            return Err(CoreError::InvalidArgument(
                "a queue bank needs at least one queue".into(),
            ));
        }
        for (i, name) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(CoreError::InvalidArgument(format!("queue name {i} is empty")));
            }
            if names[..i].contains(name) {
                return Err(CoreError::InvalidArgument(format!("queue name {name:?} appears twice")));
            }
        }
        let backlog = vec![0.0; names.len()];
        Ok(QueueBank { names, backlog })
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn backlog(&self) -> &[f64] {
        &self.backlog
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn index_of(&self, name: &str) -> CoreResult<usize> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| CoreError::InvalidArgument(format!("no queue named {name:?} (queues: {:?})", self.names)))
    }

    pub fn set_backlog(&mut self, values: &[f64]) -> CoreResult<()> {
        self.check_len("backlog", values.len())?;
        check_values("backlog", values, true)?;
        self.backlog.copy_from_slice(values);
        Ok(())
    }

    /// `L = ½ Σ Q_i²`.
    pub fn lyapunov(&self) -> f64 {
        0.5 * self.backlog.iter().map(|q| q * q).sum::<f64>()
    }

    /// Advances every queue by one slot and returns the drift `L(t+1) − L(t)`.
    pub fn step(&mut self, arrivals: &[f64], service: &[f64]) -> CoreResult<f64> {
        self.check_len("arrivals", arrivals.len())?;
        self.check_len("service", service.len())?;
        check_values("arrivals", arrivals, true)?;
        check_values("service", service, true)?;
        let before = self.lyapunov();
        for ((q, a), b) in self.backlog.iter_mut().zip(arrivals).zip(service) {
            *q = (*q + a - b).max(0.0);
        }
        Ok(self.lyapunov() - before)
    }

    /// Scores `n` candidate actions: `penalty` has `n` entries, `arrivals` and `service` are
    /// row-major `n × len()` matrices. Lower is better.
    pub fn drift_plus_penalty(
        &self,
        v: f64,
        penalty: &[f64],
        arrivals: &[f64],
        service: &[f64],
    ) -> CoreResult<Vec<f64>> {
        if !v.is_finite() || v < 0.0 {
            return Err(CoreError::InvalidArgument(format!("V = {v} must be finite and >= 0")));
        }
        let k = self.len();
        let n = penalty.len();
        for (what, m) in [("arrivals", arrivals), ("service", service)] {
            if m.len() != n * k {
                return Err(CoreError::ShapeMismatch(format!(
                    "{what} must be an ({n}, {k}) matrix for {n} actions and {k} queues, got {} values",
                    m.len()
                )));
            }
        }
        check_values("penalty", penalty, false)?;
        check_values("arrivals", arrivals, true)?;
        check_values("service", service, true)?;
        let scores = penalty
            .iter()
            .zip(arrivals.chunks_exact(k.max(1)))
            .zip(service.chunks_exact(k.max(1)))
            .map(|((p, a), b)| {
                let drift: f64 = self.backlog.iter().zip(a).zip(b).map(|((q, a), b)| q * (a - b)).sum();
                v * p + drift
            })
            .collect();
        Ok(scores)
    }

    fn check_len(&self, what: &str, len: usize) -> CoreResult<()> {
        if len == self.len() {
            Ok(())
        } else {
            Err(CoreError::ShapeMismatch(format!(
                "{what} has {len} values but the bank has {} queues",
                self.len()
            )))
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new(SNAPSHOT_KIND);
        w.u64(self.len() as u64);
        for (name, q) in self.names.iter().zip(&self.backlog) {
            w.str(name).f64(*q);
        }
        w.finish()
    }

    pub fn from_bytes(data: &[u8]) -> CoreResult<Self> {
        let mut r = Reader::new(data, SNAPSHOT_KIND, "queue bank")?;
        let n = r.len(16)?;
        let mut names = Vec::with_capacity(n);
        let mut backlog = Vec::with_capacity(n);
        for _ in 0..n {
            names.push(r.str()?);
            backlog.push(r.f64()?);
        }
        r.finish()?;
        let mut bank =
            QueueBank::new(names).map_err(|e| CoreError::BadSnapshot(format!("queue bank snapshot: {e}")))?;
        bank.set_backlog(&backlog)
            .map_err(|e| CoreError::BadSnapshot(format!("queue bank snapshot: {e}")))?;
        Ok(bank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bank() -> QueueBank {
        QueueBank::new(vec!["work".into(), "energy".into()]).unwrap()
    }

    #[test]
    fn queues_never_go_negative_and_drift_is_exact() {
        let mut b = bank();
        let drift = b.step(&[3.0, 1.0], &[1.0, 0.0]).unwrap();
        assert_eq!(b.backlog(), &[2.0, 1.0]);
        assert_eq!(drift, 0.5 * (4.0 + 1.0));
        let drift = b.step(&[0.0, 0.0], &[5.0, 0.5]).unwrap();
        assert_eq!(b.backlog(), &[0.0, 0.5]);
        assert_eq!(drift, 0.5 * 0.25 - 2.5);
    }

    #[test]
    fn drift_plus_penalty_scores_each_action() {
        let mut b = bank();
        b.set_backlog(&[2.0, 10.0]).unwrap();
        let scores = b
            .drift_plus_penalty(0.5, &[1.0, 4.0], &[1.0, 0.0, 0.0, 0.0], &[0.0, 1.0, 1.0, 0.5])
            .unwrap();
        assert_eq!(scores, vec![0.5 + 2.0 - 10.0, 2.0 - 2.0 - 5.0]);
    }

    #[test]
    fn bad_shapes_and_values_are_rejected() {
        let mut b = bank();
        assert!(matches!(b.step(&[1.0], &[1.0, 1.0]), Err(CoreError::ShapeMismatch(_))));
        assert!(matches!(
            b.step(&[-1.0, 0.0], &[0.0, 0.0]),
            Err(CoreError::InvalidArgument(_))
        ));
        assert!(matches!(
            b.drift_plus_penalty(1.0, &[0.0], &[0.0; 3], &[0.0; 2]),
            Err(CoreError::ShapeMismatch(_))
        ));
        assert!(QueueBank::new(vec!["a".into(), "a".into()]).is_err());
    }

    #[test]
    fn snapshot_round_trips_and_detects_corruption() {
        let mut b = bank();
        b.step(&[1.5, 2.5], &[0.0, 0.0]).unwrap();
        let bytes = b.to_bytes();
        assert_eq!(QueueBank::from_bytes(&bytes).unwrap(), b);
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        assert!(matches!(QueueBank::from_bytes(&bad), Err(CoreError::BadSnapshot(_))));
        assert!(QueueBank::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }
}
