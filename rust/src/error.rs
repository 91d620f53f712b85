//! The one error type of the numeric core. `py::errors` maps each variant to the class of the
//! same name in `splitwise_core.errors`; nothing here knows about Python.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum CoreError {
    UnknownCodec(String),
    NonFiniteInput {
        index: usize,
    },
    OutOfRange {
        index: usize,
        value: f32,
        limit: f32,
    },
    BufferSize {
        expected: usize,
        actual: usize,
    },
    ShapeMismatch(String),
    CorruptData(String),
    InvalidArgument(String),
    BadSnapshot(String),
    /// A long operation stopped early on request (e.g. by its progress callback).
    Stopped(String),
    /// A GGUF file that cannot be used; `problem` says why.
    ModelFile {
        path: String,
        problem: String,
    },
}

pub type CoreResult<T> = Result<T, CoreError>;

impl CoreError {
    /// Name of the Python exception class this error becomes.
    pub fn class_name(&self) -> &'static str {
        match self {
            CoreError::UnknownCodec(_) => "UnknownCodecError",
            CoreError::NonFiniteInput { .. } => "NonFiniteInputError",
            CoreError::OutOfRange { .. } => "CodecRangeError",
            CoreError::BufferSize { .. } => "BufferSizeError",
            CoreError::ShapeMismatch(_) => "ShapeMismatchError",
            CoreError::CorruptData(_) => "CorruptDataError",
            CoreError::InvalidArgument(_) => "InvalidArgumentError",
            CoreError::BadSnapshot(_) => "SnapshotError",
            CoreError::Stopped(_) => "StoppedError",
            CoreError::ModelFile { .. } => "ModelFileError",
        }
    }
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::UnknownCodec(name) => write!(
                f,
                "unknown codec {name:?}; expected one of \"f32\", \"f16\", \"q8_0\", \"q4_0\""
            ),
            CoreError::NonFiniteInput { index } => {
                write!(f, "input contains NaN or infinity at flat index {index}")
            }
            CoreError::OutOfRange { index, value, limit } => write!(
                f,
                "value {value:e} at flat index {index} is outside the codec's range (|x| < {limit:e}); \
                 its scale would overflow float16"
            ),
            CoreError::BufferSize { expected, actual } => {
                write!(f, "buffer holds {actual} bytes but {expected} bytes were expected")
            }
            CoreError::ShapeMismatch(msg)
            | CoreError::CorruptData(msg)
            | CoreError::InvalidArgument(msg)
            | CoreError::BadSnapshot(msg)
            | CoreError::Stopped(msg) => f.write_str(msg),
            CoreError::ModelFile { path, problem } => write!(f, "model file {path}: {problem}"),
        }
    }
}

impl std::error::Error for CoreError {}
