use super::c_contiguous_slice;
use crate::lyapunov as core;
use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// Named virtual queues with drift and drift-plus-penalty.
#[pyclass(module = "splitwise_core._core", from_py_object)]
#[derive(Clone)]
pub struct QueueBank {
    inner: core::QueueBank,
}

#[pymethods]
impl QueueBank {
    #[new]
    fn new(names: Vec<String>) -> PyResult<Self> {
        Ok(QueueBank {
            inner: core::QueueBank::new(names)?,
        })
    }

    #[getter]
    fn names(&self) -> Vec<String> {
        self.inner.names().to_vec()
    }

    #[getter]
    fn backlog<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        PyArray1::from_slice(py, self.inner.backlog())
    }

    fn set_backlog(&mut self, values: Vec<f64>) -> PyResult<()> {
        Ok(self.inner.set_backlog(&values)?)
    }

    fn __getitem__(&self, name: &str) -> PyResult<f64> {
        Ok(self.inner.backlog()[self.inner.index_of(name)?])
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn lyapunov(&self) -> f64 {
        self.inner.lyapunov()
    }

    fn step(&mut self, arrivals: Vec<f64>, service: Vec<f64>) -> PyResult<f64> {
        Ok(self.inner.step(&arrivals, &service)?)
    }

    fn drift_plus_penalty<'py>(
        &self,
        py: Python<'py>,
        v: f64,
        penalty: PyReadonlyArray1<'py, f64>,
        arrivals: PyReadonlyArray2<'py, f64>,
        service: PyReadonlyArray2<'py, f64>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let (p, a, s) = (
            c_contiguous_slice("penalty", &penalty)?,
            c_contiguous_slice("arrivals", &arrivals)?,
            c_contiguous_slice("service", &service)?,
        );
        let scores = py.detach(|| self.inner.drift_plus_penalty(v, p, a, s))?;
        Ok(PyArray1::from_vec(py, scores))
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        Ok(QueueBank {
            inner: core::QueueBank::from_bytes(data)?,
        })
    }

    fn __repr__(&self) -> String {
        let pairs: Vec<String> = self
            .inner
            .names()
            .iter()
            .zip(self.inner.backlog())
            .map(|(n, q)| format!("{n}={q}"))
            .collect();
        format!("QueueBank({})", pairs.join(", "))
    }
}

/// Exponentially weighted moving average with a half-life in units of sample weight.
#[pyclass(module = "splitwise_core._core", from_py_object)]
#[derive(Clone)]
pub struct Ewma {
    inner: core::Ewma,
}

#[pymethods]
impl Ewma {
    #[new]
    fn new(half_life: f64) -> PyResult<Self> {
        Ok(Ewma {
            inner: core::Ewma::new(half_life)?,
        })
    }

    #[pyo3(signature = (sample, weight = 1.0))]
    fn update(&mut self, sample: f64, weight: f64) -> PyResult<f64> {
        Ok(self.inner.update(sample, weight)?)
    }

    #[getter]
    fn value(&self) -> Option<f64> {
        self.inner.value()
    }

    #[getter]
    fn count(&self) -> u64 {
        self.inner.count()
    }

    #[getter]
    fn half_life(&self) -> f64 {
        self.inner.half_life()
    }

    fn reset(&mut self) {
        self.inner.reset()
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        Ok(Ewma {
            inner: core::Ewma::from_bytes(data)?,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Ewma(half_life={}, value={:?}, count={})",
            self.inner.half_life(),
            self.inner.value(),
            self.inner.count()
        )
    }
}

/// Streaming quantiles within a relative error of the exact order statistic.
#[pyclass(module = "splitwise_core._core", from_py_object)]
#[derive(Clone)]
pub struct QuantileTracker {
    inner: core::QuantileTracker,
}

#[pymethods]
impl QuantileTracker {
    #[new]
    #[pyo3(signature = (relative_accuracy = 0.01))]
    fn new(relative_accuracy: f64) -> PyResult<Self> {
        Ok(QuantileTracker {
            inner: core::QuantileTracker::new(relative_accuracy)?,
        })
    }

    fn add(&mut self, sample: f64) -> PyResult<()> {
        Ok(self.inner.add(sample)?)
    }

    fn add_many(&mut self, py: Python<'_>, samples: PyReadonlyArray1<'_, f64>) -> PyResult<()> {
        let xs = c_contiguous_slice("samples", &samples)?;
        let inner = &mut self.inner;
        Ok(py.detach(|| inner.add_many(xs))?)
    }

    fn quantile(&self, q: f64) -> PyResult<Option<f64>> {
        Ok(self.inner.quantile(q)?)
    }

    fn merge(&mut self, other: &QuantileTracker) -> PyResult<()> {
        Ok(self.inner.merge(&other.inner)?)
    }

    #[getter]
    fn count(&self) -> u64 {
        self.inner.count()
    }

    #[getter]
    fn mean(&self) -> Option<f64> {
        self.inner.mean()
    }

    #[getter]
    fn min(&self) -> Option<f64> {
        self.inner.min()
    }

    #[getter]
    fn max(&self) -> Option<f64> {
        self.inner.max()
    }

    #[getter]
    fn relative_accuracy(&self) -> f64 {
        self.inner.relative_accuracy()
    }

    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }

    #[staticmethod]
    fn from_bytes(data: &[u8]) -> PyResult<Self> {
        Ok(QuantileTracker {
            inner: core::QuantileTracker::from_bytes(data)?,
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "QuantileTracker(relative_accuracy={}, count={})",
            self.inner.relative_accuracy(),
            self.inner.count()
        )
    }
}
