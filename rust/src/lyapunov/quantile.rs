//! Streaming quantiles with a relative-error guarantee (the DDSketch construction).
//!
//! Values are counted in logarithmic buckets `(γ^(i−1), γ^i]` with `γ = (1+α)/(1−α)`, where α is
//! the relative accuracy. **Error bound:** for `q` in [0, 1] and `n` samples, `quantile(q)` is
//! within `α·x` of `x`, the sample of rank `⌊q·(n−1)⌋` in sorted order (numpy's
//! `percentile(..., method="lower")`). Memory grows with the logarithm of the value range, not
//! with the number of samples. Values must be finite and ≥ 0; exact zeros have their own bucket.

use super::snapshot::{Reader, Writer};
use crate::error::{CoreError, CoreResult};

const SNAPSHOT_KIND: u8 = 3;
pub const MIN_RELATIVE_ACCURACY: f64 = 1e-3;
pub const MAX_RELATIVE_ACCURACY: f64 = 0.2;

#[derive(Debug, Clone, PartialEq)]
pub struct QuantileTracker {
    alpha: f64,
    ln_gamma: f64,
    zero_count: u64,
    first_index: i64,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl QuantileTracker {
    pub fn new(relative_accuracy: f64) -> CoreResult<Self> {
        let alpha = relative_accuracy;
        if !(MIN_RELATIVE_ACCURACY..=MAX_RELATIVE_ACCURACY).contains(&alpha) {
            return Err(CoreError::InvalidArgument(format!(
                "relative_accuracy = {alpha} must lie in [{MIN_RELATIVE_ACCURACY}, {MAX_RELATIVE_ACCURACY}]"
            )));
        }
        let gamma = (1.0 + alpha) / (1.0 - alpha);
        Ok(QuantileTracker {
            alpha,
            ln_gamma: gamma.ln(),
            zero_count: 0,
            first_index: 0,
            counts: Vec::new(),
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        })
    }

    pub fn relative_accuracy(&self) -> f64 {
        self.alpha
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
    pub fn min(&self) -> Option<f64> {
        (self.count > 0).then_some(self.min)
    }
    pub fn max(&self) -> Option<f64> {
        (self.count > 0).then_some(self.max)
    }

    fn bucket_of(&self, x: f64) -> i64 {
        (x.ln() / self.ln_gamma).ceil() as i64
    }

    fn representative(&self, index: i64) -> f64 {
        let gamma = self.ln_gamma.exp();
        2.0 * (index as f64 * self.ln_gamma).exp() / (gamma + 1.0)
    }

    fn check_sample(x: f64) -> CoreResult<()> {
        if x.is_finite() && x >= 0.0 {
            Ok(())
        } else {
            Err(CoreError::InvalidArgument(format!(
                "sample {x} must be finite and >= 0"
            )))
        }
    }

    pub fn add(&mut self, x: f64) -> CoreResult<()> {
        Self::check_sample(x)?;
        self.insert(x);
        Ok(())
    }

    /// Adds all samples, or none if any is invalid.
    pub fn add_many(&mut self, xs: &[f64]) -> CoreResult<()> {
        if let Some((i, &x)) = xs.iter().enumerate().find(|(_, x)| Self::check_sample(**x).is_err()) {
            return Err(CoreError::InvalidArgument(format!(
                "sample [{i}] = {x} must be finite and >= 0"
            )));
        }
        for &x in xs {
            self.insert(x);
        }
        Ok(())
    }

    fn insert(&mut self, x: f64) {
        self.count += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        if x == 0.0 {
            self.zero_count += 1;
            return;
        }
        let index = self.bucket_of(x);
        self.bump(index, 1);
    }

    fn bump(&mut self, index: i64, by: u64) {
        if self.counts.is_empty() {
            self.first_index = index;
            self.counts.push(0);
        } else if index < self.first_index {
            let grow = (self.first_index - index) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.first_index = index;
        } else if index >= self.first_index + self.counts.len() as i64 {
            self.counts.resize((index - self.first_index) as usize + 1, 0);
        }
        self.counts[(index - self.first_index) as usize] += by;
    }

    /// The estimate of quantile `q` (see the module's error bound), or `None` with no samples.
    pub fn quantile(&self, q: f64) -> CoreResult<Option<f64>> {
        if !(0.0..=1.0).contains(&q) {
            return Err(CoreError::InvalidArgument(format!(
                "quantile q = {q} must lie in [0, 1]"
            )));
        }
        if self.count == 0 {
            return Ok(None);
        }
        let rank = (q * (self.count - 1) as f64).floor() as u64;
        if rank < self.zero_count {
            return Ok(Some(0.0));
        }
        let mut seen = self.zero_count;
        for (offset, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                let estimate = self.representative(self.first_index + offset as i64);
                return Ok(Some(estimate.clamp(self.min, self.max)));
            }
        }
        Ok(Some(self.max))
    }

    pub fn merge(&mut self, other: &QuantileTracker) -> CoreResult<()> {
        if other.alpha != self.alpha {
            return Err(CoreError::InvalidArgument(format!(
                "cannot merge trackers of relative accuracy {} and {}",
                self.alpha, other.alpha
            )));
        }
        for (offset, &c) in other.counts.iter().enumerate() {
            if c > 0 {
                self.bump(other.first_index + offset as i64, c);
            }
        }
        self.zero_count += other.zero_count;
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new(SNAPSHOT_KIND);
        w.f64(self.alpha)
            .u64(self.count)
            .u64(self.zero_count)
            .f64(self.sum)
            .f64(self.min)
            .f64(self.max);
        w.i64(self.first_index).u64(self.counts.len() as u64);
        for &c in &self.counts {
            w.u64(c);
        }
        w.finish()
    }

    pub fn from_bytes(data: &[u8]) -> CoreResult<Self> {
        let mut r = Reader::new(data, SNAPSHOT_KIND, "quantile tracker")?;
        let mut t = QuantileTracker::new(r.f64()?)
            .map_err(|e| CoreError::BadSnapshot(format!("quantile tracker snapshot: {e}")))?;
        t.count = r.u64()?;
        t.zero_count = r.u64()?;
        t.sum = r.f64()?;
        t.min = r.f64()?;
        t.max = r.f64()?;
        t.first_index = r.i64()?;
        let n = r.len(8)?;
        t.counts = (0..n).map(|_| r.u64()).collect::<CoreResult<_>>()?;
        let bucketed = t.counts.iter().try_fold(t.zero_count, |acc, &c| acc.checked_add(c));
        if bucketed != Some(t.count) {
            return Err(r.invalid("bucket counts do not add up to the sample count"));
        }
        r.finish()?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_the_relative_bound() {
        let mut t = QuantileTracker::new(0.01).unwrap();
        let mut xs: Vec<f64> = (1..=10_000).map(|i| (i as f64).powf(1.7) * 1e-4).collect();
        t.add_many(&xs).unwrap();
        xs.sort_by(f64::total_cmp);
        for q in [0.0, 0.01, 0.5, 0.95, 0.99, 1.0] {
            let exact = xs[(q * (xs.len() - 1) as f64).floor() as usize];
            let est = t.quantile(q).unwrap().unwrap();
            assert!(
                (est - exact).abs() <= 0.01 * exact * (1.0 + 1e-9),
                "q={q}: {est} vs {exact}"
            );
        }
    }

    #[test]
    fn zeros_empty_and_bad_input() {
        let mut t = QuantileTracker::new(0.02).unwrap();
        assert_eq!(t.quantile(0.5).unwrap(), None);
        t.add_many(&[0.0, 0.0, 0.0, 5.0]).unwrap();
        assert_eq!(t.quantile(0.5).unwrap(), Some(0.0));
        assert!(t.add(-1.0).is_err());
        assert!(t.add_many(&[1.0, f64::NAN]).is_err());
        assert_eq!(t.count(), 4);
        assert!(t.quantile(1.5).is_err());
    }

    #[test]
    fn merge_and_snapshot() {
        let mut a = QuantileTracker::new(0.01).unwrap();
        let mut b = QuantileTracker::new(0.01).unwrap();
        a.add_many(&[1.0, 2.0, 3.0]).unwrap();
        b.add_many(&[1000.0, 0.001]).unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.count(), 5);
        assert_eq!(a.max(), Some(1000.0));
        let restored = QuantileTracker::from_bytes(&a.to_bytes()).unwrap();
        assert_eq!(restored, a);
        assert!(a.merge(&QuantileTracker::new(0.05).unwrap()).is_err());
    }
}
