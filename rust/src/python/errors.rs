//! Mapping of [`crate::Error`] to Python exceptions. The exception classes are made at
//! import time with both bases (`RotateKVError` and the matching builtin), so that
//! `except ValueError` and `except rotatekv.RotateKVError` both work.

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use crate::error::Error;

pyo3::create_exception!(
    rotatekv,
    RotateKVError,
    PyException,
    "Base class of every rotatekv error."
);

/// Names and builtin bases of the subclasses.
pub const SUBCLASSES: [(&str, &str, &str); 7] = [
    (
        "ShapeError",
        "ValueError",
        "An argument has the wrong shape.",
    ),
    (
        "ArgumentError",
        "ValueError",
        "An argument has a value out of range or inconsistent with the store.",
    ),
    (
        "DTypeError",
        "TypeError",
        "An argument has the wrong type or element type.",
    ),
    (
        "FormatError",
        "ValueError",
        "A file is damaged or was written for something else.",
    ),
    (
        "StoreIOError",
        "OSError",
        "The operating system refused a read or a write.",
    ),
    (
        "DeviceError",
        "RuntimeError",
        "A device (GPU) was asked for and is not available.",
    ),
    (
        "CapacityError",
        "MemoryError",
        "An append would pass the store's configured capacity; the store is unchanged.",
    ),
];

static CLASSES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

/// Creates the subclasses and adds them to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("RotateKVError", py.get_type::<RotateKVError>())?;
    let builtins = py.import("builtins")?;
    let ty = builtins.getattr("type")?;
    let mut classes = Vec::new();
    for (name, base, doc) in SUBCLASSES {
        let bases = PyTuple::new(
            py,
            [
                py.get_type::<RotateKVError>().into_any(),
                builtins.getattr(base)?,
            ],
        )?;
        let ns = PyDict::new(py);
        ns.set_item("__doc__", doc)?;
        ns.set_item("__module__", "rotatekv")?;
        let cls = ty.call1((name, bases, ns))?.cast_into::<PyType>()?;
        m.add(name, &cls)?;
        classes.push(cls.unbind());
    }
    let _ = CLASSES.set(py, classes);
    Ok(())
}

/// Builds the exception of `index` in [`SUBCLASSES`].
pub fn raise(py: Python<'_>, index: usize, msg: String) -> PyErr {
    match CLASSES.get(py) {
        Some(c) => PyErr::from_type(c[index].bind(py).clone(), msg),
        None => RotateKVError::new_err(msg),
    }
}

/// A shape error naming an argument.
pub fn shape_err(py: Python<'_>, msg: String) -> PyErr {
    raise(py, 0, msg)
}
/// A value error naming an argument.
pub fn arg_err(py: Python<'_>, msg: String) -> PyErr {
    raise(py, 1, msg)
}
/// A type error naming an argument.
pub fn dtype_err(py: Python<'_>, msg: String) -> PyErr {
    raise(py, 2, msg)
}
/// A device error.
pub fn device_err(py: Python<'_>, msg: String) -> PyErr {
    raise(py, 5, msg)
}

/// Converts a crate error.
pub fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Shape { .. } => raise(py, 0, msg),
        Error::Value { .. } => raise(py, 1, msg),
        Error::DType { .. } => raise(py, 2, msg),
        Error::Format { .. } => raise(py, 3, msg),
        Error::Io { .. } => raise(py, 4, msg),
        Error::Device { .. } => raise(py, 5, msg),
        Error::Capacity { .. } => raise(py, 6, msg),
    }
}
