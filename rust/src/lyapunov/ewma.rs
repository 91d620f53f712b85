//! Exponentially weighted moving average with a half-life. Each sample carries a weight
//! (1 for "one observation", or the seconds elapsed for a time-based average); a sample's
//! influence halves after `half_life` units of weight have followed it. The first sample
//! initialises the average, so there is no start-up bias toward zero.

use super::snapshot::{Reader, Writer};
use crate::error::{CoreError, CoreResult};

const SNAPSHOT_KIND: u8 = 2;

#[derive(Debug, Clone, PartialEq)]
pub struct Ewma {
    half_life: f64,
    value: Option<f64>,
    count: u64,
}

impl Ewma {
    pub fn new(half_life: f64) -> CoreResult<Self> {
        if !half_life.is_finite() || half_life <= 0.0 {
            return Err(CoreError::InvalidArgument(format!(
                "half_life = {half_life} must be finite and > 0"
            )));
        }
        Ok(Ewma {
            half_life,
            value: None,
            count: 0,
        })
    }

    pub fn half_life(&self) -> f64 {
        self.half_life
    }

    pub fn value(&self) -> Option<f64> {
        self.value
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn update(&mut self, sample: f64, weight: f64) -> CoreResult<f64> {
        if !sample.is_finite() {
            return Err(CoreError::InvalidArgument(format!("sample = {sample} must be finite")));
        }
        if !weight.is_finite() || weight <= 0.0 {
            return Err(CoreError::InvalidArgument(format!(
                "weight = {weight} must be finite and > 0"
            )));
        }
        let next = match self.value {
            None => sample,
            Some(prev) => {
                let keep = (-weight / self.half_life).exp2();
                keep * prev + (1.0 - keep) * sample
            }
        };
        self.value = Some(next);
        self.count += 1;
        Ok(next)
    }

    pub fn reset(&mut self) {
        self.value = None;
        self.count = 0;
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new(SNAPSHOT_KIND);
        w.f64(self.half_life)
            .u64(self.count)
            .f64(self.value.unwrap_or(f64::NAN));
        w.finish()
    }

    pub fn from_bytes(data: &[u8]) -> CoreResult<Self> {
        let mut r = Reader::new(data, SNAPSHOT_KIND, "EWMA")?;
        let (half_life, count, value) = (r.f64()?, r.u64()?, r.f64()?);
        r.finish()?;
        let mut ewma = Ewma::new(half_life).map_err(|e| CoreError::BadSnapshot(format!("EWMA snapshot: {e}")))?;
        match (count, value.is_finite()) {
            (0, false) => {}
            (c, true) if c > 0 => {
                ewma.value = Some(value);
                ewma.count = c;
            }
            _ => return Err(CoreError::BadSnapshot("EWMA snapshot: count and value disagree".into())),
        }
        Ok(ewma)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sample_initialises_and_half_life_halves_influence() {
        let mut e = Ewma::new(2.0).unwrap();
        assert_eq!(e.update(10.0, 1.0).unwrap(), 10.0);
        // After two units of weight the old value keeps exactly half its influence.
        assert!((e.update(0.0, 2.0).unwrap() - 5.0).abs() < 1e-12);
    }

    #[test]
    fn converges_to_a_constant_signal() {
        let mut e = Ewma::new(3.0).unwrap();
        e.update(100.0, 1.0).unwrap();
        for _ in 0..200 {
            e.update(1.0, 1.0).unwrap();
        }
        assert!((e.value().unwrap() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn rejects_bad_arguments_and_snapshots() {
        assert!(Ewma::new(0.0).is_err());
        let mut e = Ewma::new(1.0).unwrap();
        assert!(e.update(f64::NAN, 1.0).is_err());
        assert!(e.update(1.0, 0.0).is_err());
        e.update(4.0, 1.0).unwrap();
        assert_eq!(Ewma::from_bytes(&e.to_bytes()).unwrap(), e);
        assert!(Ewma::from_bytes(b"SWLY").is_err());
    }
}
