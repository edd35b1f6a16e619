//! rotatekv: packed low-bit KV caches with rotations and fused attention.
//!
//! The crate is usable without Python; the PyO3 bindings live in [`python`] behind the
//! `python` feature.
#![deny(missing_docs)]

pub mod attend;
pub mod config;
pub mod cuda;
pub mod device;
pub mod error;
pub mod format;
pub mod hadamard;
pub mod io;
pub mod page;
pub mod paged;
pub mod persist;
pub mod quant;
pub mod rope;
pub mod rotation;
pub mod saliency;
pub mod simd;
pub mod store;
pub mod tensor;

#[cfg(feature = "python")]
pub mod python;

pub use attend::AttendArgs;
pub use config::{KeyLayout, QuantConfig};
pub use error::{Error, Result};
pub use format::FpFormat;
pub use hadamard::Hadamard;
pub use rope::Rope;
pub use rotation::{Mode, RotationPlan};
pub use store::{AppendArgs, KVStore};
pub use tensor::{DType, Data, OutData, View4};
