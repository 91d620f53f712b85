//! Thin PyO3 bindings: borrow the Python inputs, detach from the interpreter, call the core,
//! wrap the result. No numeric logic lives here.

mod codecs;
mod errors;
mod lyapunov;

use pyo3::prelude::*;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(codecs::encode, m)?)?;
    m.add_function(wrap_pyfunction!(codecs::decode, m)?)?;
    m.add_function(wrap_pyfunction!(codecs::codec_size, m)?)?;
    m.add_function(wrap_pyfunction!(codecs::crc32c, m)?)?;
    m.add(
        "CODECS",
        crate::quant::Codec::ALL.map(|c| c.name()).to_vec(),
    )?;
    m.add("BLOCK_LEN", crate::quant::BLOCK_LEN)?;
    m.add_class::<lyapunov::QueueBank>()?;
    m.add_class::<lyapunov::Ewma>()?;
    m.add_class::<lyapunov::QuantileTracker>()?;
    Ok(())
}
