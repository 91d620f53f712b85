use super::c_contiguous_slice;
use super::errors::raise;
use crate::quant::Codec;
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

fn parse_codec(name: &str) -> PyResult<Codec> {
    Ok(Codec::parse(name)?)
}

/// Encodes a C-contiguous float32 array (any shape) with `codec`.
#[pyfunction]
pub fn encode<'py>(py: Python<'py>, x: &Bound<'py, PyAny>, codec: &str) -> PyResult<Bound<'py, PyBytes>> {
    let codec = parse_codec(codec)?;
    let untyped = x.cast::<PyUntypedArray>().map_err(|_| {
        raise(
            "DTypeError",
            format!("expected a numpy.ndarray of float32, got {}", type_name(x)),
        )
    })?;
    let dtype = untyped.dtype();
    let array = untyped
        .cast::<PyArrayDyn<f32>>()
        .map_err(|_| raise("DTypeError", format!("expected dtype float32, got {dtype}")))?;
    let readonly = array.try_readonly().map_err(|e| raise("LayoutError", e.to_string()))?;
    let values = c_contiguous_slice("x", &readonly)?;
    PyBytes::new_with(py, codec.encoded_size(values.len()), |out| {
        py.detach(|| codec.encode(values, out)).map_err(PyErr::from)
    })
}

/// Decodes `buf` (any C-contiguous buffer) holding `shape` values in `codec`.
#[pyfunction]
pub fn decode<'py>(
    py: Python<'py>,
    buf: &Bound<'py, PyAny>,
    codec: &str,
    shape: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let codec = parse_codec(codec)?;
    let dims = parse_shape(shape)?;
    let n = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| raise("ShapeMismatchError", format!("shape {dims:?} is too large")))?;
    let buffer = PyUntypedBuffer::get(buf).map_err(|_| {
        raise(
            "DTypeError",
            format!("expected a bytes-like object, got {}", type_name(buf)),
        )
    })?;
    if !buffer.is_c_contiguous() {
        return Err(raise("LayoutError", "buffer is not C-contiguous".to_string()));
    }
    let expected = codec.encoded_size(n);
    if buffer.len_bytes() != expected {
        return Err(raise(
            "BufferSizeError",
            format!(
                "a {} buffer for shape {dims:?} ({n} values) holds {expected} bytes, got {}",
                codec.name(),
                buffer.len_bytes()
            ),
        ));
    }
    // SAFETY: the buffer is C-contiguous and `buffer` keeps it exported (and alive) until the
    // end of this function; we only read it.
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buffer.buf_ptr() as *const u8, buffer.len_bytes()) };
    let mut out = vec![0f32; n];
    py.detach(|| codec.decode(bytes, &mut out))?;
    PyArray1::from_vec(py, out).reshape(dims)
}

/// Bytes that `n` values occupy in `codec`.
#[pyfunction]
pub fn codec_size(codec: &str, n: i64) -> PyResult<usize> {
    let codec = parse_codec(codec)?;
    let n = usize::try_from(n).map_err(|_| raise("InvalidArgumentError", format!("n = {n} must be >= 0")))?;
    Ok(codec.encoded_size(n))
}

/// CRC-32C (Castagnoli) of any C-contiguous buffer.
#[pyfunction]
pub fn crc32c(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<u32> {
    let buffer = PyUntypedBuffer::get(data).map_err(|_| {
        raise(
            "DTypeError",
            format!("expected a bytes-like object, got {}", type_name(data)),
        )
    })?;
    if !buffer.is_c_contiguous() {
        return Err(raise("LayoutError", "buffer is not C-contiguous".to_string()));
    }
    // SAFETY: as in `decode`.
    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buffer.buf_ptr() as *const u8, buffer.len_bytes()) };
    Ok(py.detach(|| crate::quant::crc32c(bytes)))
}

fn parse_shape(shape: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    let dims: Vec<i64> = if let Ok(n) = shape.extract::<i64>() {
        vec![n]
    } else {
        shape.extract::<Vec<i64>>().map_err(|_| {
            raise(
                "ShapeMismatchError",
                format!("shape must be an int or a sequence of ints, got {}", type_name(shape)),
            )
        })?
    };
    dims.iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| raise("ShapeMismatchError", format!("shape {dims:?} has a negative dimension")))
        })
        .collect()
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".to_string())
}
