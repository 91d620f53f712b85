//! The one error bridge: every core error becomes the class of the same name in
//! `splitwise_core.errors`, so Python code catches one hierarchy.

use crate::error::CoreError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

static ERRORS_MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// An exception of class `class_name` from `splitwise_core.errors`.
pub fn raise(class_name: &str, message: String) -> PyErr {
    Python::attach(|py| {
        let module = ERRORS_MODULE.get_or_try_init(py, || py.import("splitwise_core.errors").map(Bound::unbind));
        let class = module
            .and_then(|m| m.bind(py).getattr(class_name))
            .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
        match class {
            Ok(class) => PyErr::from_type(class, message),
            Err(import_error) => import_error,
        }
    })
}

impl From<CoreError> for PyErr {
    fn from(err: CoreError) -> PyErr {
        raise(err.class_name(), err.to_string())
    }
}
