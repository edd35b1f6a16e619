//! The CUDA backend: kernel sources (`cuda/*.cu`, embedded), their parameter ABI, NVRTC
//! compilation, and a host emulation of the kernels for tests without a GPU.
//!
//! Libraries are opened at run time (cudarc's `dynamic-loading`), so the crate builds and
//! runs with no CUDA installed; every entry point checks for the library before touching it
//! (cudarc panics on a missing one).

pub mod abi;
pub mod backend;
#[cfg(feature = "cuda-emu")]
pub mod emu;
pub mod launch;
pub mod nvrtc;

/// The shared header every kernel file includes.
pub const HEADER: &str = include_str!("../../../cuda/rotatekv.cuh");

/// Kernel files: (file name, source).
pub const KERNEL_FILES: [(&str, &str); 4] = [
    ("hadamard.cu", include_str!("../../../cuda/hadamard.cu")),
    ("quant.cu", include_str!("../../../cuda/quant.cu")),
    ("attend.cu", include_str!("../../../cuda/attend.cu")),
    ("saliency.cu", include_str!("../../../cuda/saliency.cu")),
];

/// The defines the header takes from the format table.
pub fn class_defines() -> String {
    format!("#define RKV_NUM_CLASSES {}\n", crate::format::NUM_CLASSES)
}

/// A kernel file with the header pasted in place of its include line (NVRTC then needs no
/// include path), after the format table's defines.
pub fn full_source(src: &str) -> String {
    class_defines() + &src.replace("#include \"rotatekv.cuh\"", HEADER)
}
