//! Thin PyO3 bindings: borrow the Python inputs, detach from the interpreter, call the core,
//! wrap the result. No numeric logic lives here.

mod codecs;
mod engine;
mod errors;
mod lyapunov;

use numpy::{Element, PyReadonlyArray, PyUntypedArrayMethods};
use pyo3::prelude::*;

/// The array's elements in memory order, which must be C order: numpy's own `as_slice` also
/// accepts Fortran order, which would silently transpose 2-D input.
fn c_contiguous_slice<'a, T: Element, D: numpy::ndarray::Dimension>(
    what: &str,
    array: &'a PyReadonlyArray<'_, T, D>,
) -> PyResult<&'a [T]> {
    let not_c = || {
        errors::raise(
            "LayoutError",
            format!("{what} is not C-contiguous; pass numpy.ascontiguousarray({what})"),
        )
    };
    if !array.is_c_contiguous() {
        return Err(not_c());
    }
    array.as_slice().map_err(|_| not_c())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(codecs::encode, m)?)?;
    m.add_function(wrap_pyfunction!(codecs::decode, m)?)?;
    m.add_function(wrap_pyfunction!(codecs::codec_size, m)?)?;
    m.add_function(wrap_pyfunction!(codecs::crc32c, m)?)?;
    m.add("CODECS", crate::quant::Codec::ALL.map(|c| c.name()).to_vec())?;
    m.add("BLOCK_LEN", crate::quant::BLOCK_LEN)?;
    m.add_class::<lyapunov::QueueBank>()?;
    m.add_class::<lyapunov::Ewma>()?;
    m.add_class::<lyapunov::QuantileTracker>()?;
    m.add_class::<engine::Model>()?;
    m.add_class::<engine::Session>()?;
    m.add_function(wrap_pyfunction!(engine::write_shards, m)?)?;
    m.add_function(wrap_pyfunction!(engine::simd_level, m)?)?;
    m.add(
        "SIMD_LEVELS",
        crate::engine::kernels::SimdLevel::ALL.map(|l| l.name()).to_vec(),
    )?;
    Ok(())
}
