//! One error type for the whole crate. The Python layer maps each variant to a
//! `RotateKVError` subclass (shape and value problems to `ValueError`, dtype problems to
//! `TypeError`, corrupted files to `FormatError`).

/// Everything that can go wrong in rotatekv.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// An argument has the wrong shape.
    #[error("{arg}: expected shape {expected}, got {got}")]
    Shape {
        /// The argument's name, as the caller spells it.
        arg: String,
        /// What was expected.
        expected: String,
        /// What was received.
        got: String,
    },
    /// An argument has a value out of range or inconsistent with the store.
    #[error("{arg}: expected {expected}, got {got}")]
    Value {
        /// The argument's name.
        arg: String,
        /// What was expected.
        expected: String,
        /// What was received.
        got: String,
    },
    /// An argument has the wrong element type.
    #[error("{arg}: expected dtype {expected}, got {got}")]
    DType {
        /// The argument's name.
        arg: String,
        /// What was expected.
        expected: String,
        /// What was received.
        got: String,
    },
    /// A file (plan or store) is damaged or was written for something else.
    #[error("{path}: {msg}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The operating system refused a read or a write.
    #[error("{path}: {msg}")]
    Io {
        /// The file.
        path: String,
        /// The OS error text.
        msg: String,
    },
    /// A device (CUDA) is missing, or a driver or compiler call failed.
    #[error("{msg}")]
    Device {
        /// What failed, and what was expected.
        msg: String,
    },
    /// An append would take the store past its configured capacity.
    #[error("capacity exceeded: {msg}")]
    Capacity {
        /// What would exceed which limit.
        msg: String,
    },
}

impl Error {
    /// A shape error.
    pub fn shape(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> Self {
        Error::Shape {
            arg: arg.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
    /// A value error.
    pub fn value(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> Self {
        Error::Value {
            arg: arg.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
    /// A dtype error.
    pub fn dtype(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> Self {
        Error::DType {
            arg: arg.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }
    /// A damaged-file error.
    pub fn format(path: &str, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// A device error.
    pub fn device(msg: impl Into<String>) -> Self {
        Error::Device { msg: msg.into() }
    }
    /// An I/O error.
    pub fn io(path: &str, err: &std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            msg: err.to_string(),
        }
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
