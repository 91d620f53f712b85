//! Splitwise's numeric core. Everything outside `py` is plain Rust with no Python in it;
//! `py` holds the thin bindings and this file only registers them.

pub mod engine;
pub mod error;
pub mod lyapunov;
pub mod quant;

#[cfg(feature = "python")]
mod py;

#[cfg(feature = "python")]
#[pyo3::pymodule]
fn _core(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
    py::register(m)
}
