//! Device memory as the kernel layer sees it: the [`DeviceMemory`] trait, owned buffers
//! ([`DevBuf`]), page-sized pools carved from slabs ([`Pool`]) and borrowed device tensors
//! ([`DevTensor`]). Pages and pools hold device memory through this module only, so they do
//! not depend on the CUDA backend that implements it (`crate::cuda::backend`).
//!
//! Streams: every call runs on the stream last given to [`DeviceMemory::set_stream`] (the
//! Python layer passes torch's current stream before each operation).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::error::Result;
use crate::tensor::DType;

/// Device memory: where device pages, pools and scratch live. Kernel launches are the
/// CUDA backend's (`crate::cuda::backend::Backend`, a `DeviceMemory` that also launches).
pub trait DeviceMemory: Send + Sync + fmt::Debug {
    /// `"cuda:N"` or `"emu"`.
    fn name(&self) -> String;
    /// Zeroed memory for a page (pooled; returned with [`DeviceMemory::free`]).
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// Returns a page's memory to the pool (stream-ordered reuse).
    fn free(&self, ptr: u64, bytes: usize);
    /// Scratch memory for one operation, freed in stream order with [`DeviceMemory::free_temp`].
    fn temp(&self, bytes: usize) -> Result<u64>;
    /// Frees scratch memory after the work queued so far.
    fn free_temp(&self, ptr: u64);
    /// Host to device (the host buffer may be reused when this returns).
    fn h2d(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Device to host; waits for the stream.
    fn d2h(&self, dst: &mut [u8], src: u64) -> Result<()>;
    /// Device to device.
    fn d2d(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    /// The stream later calls run on (a `CUstream` handle; 0: the legacy default stream).
    fn set_stream(&self, stream: u64);
    /// Multiprocessors (sizes the split-K of attention).
    fn sm_count(&self) -> usize;
    /// Waits for the work queued on the current stream.
    fn sync(&self) -> Result<()>;
    /// DLPack device of this memory: (device type, id).
    fn dlpack_device(&self) -> (i32, i32);
}

/// A device allocation owned by a page; freed (back to the pool) on drop, deep-copied on
/// clone (copy on write of pages shared by beam search).
pub struct DevBuf {
    /// Device address.
    pub ptr: u64,
    /// Size.
    pub bytes: usize,
    /// The backend it came from.
    pub backend: Arc<dyn DeviceMemory>,
}

impl DevBuf {
    /// A zeroed buffer.
    pub fn new(backend: Arc<dyn DeviceMemory>, bytes: usize) -> Result<Self> {
        Ok(DevBuf {
            ptr: backend.alloc(bytes)?,
            bytes,
            backend,
        })
    }

    /// A device copy.
    pub fn try_clone(&self) -> Result<Self> {
        let b = DevBuf::new(self.backend.clone(), self.bytes)?;
        self.backend.d2d(b.ptr, self.ptr, self.bytes)?;
        Ok(b)
    }
}

impl Clone for DevBuf {
    fn clone(&self) -> Self {
        // Reached through `Arc::make_mut` when a page shared by `reorder` is written. The
        // Python layer turns a panic here (device out of memory) into a DeviceError.
        match self.try_clone() {
            Ok(b) => b,
            Err(e) => panic!("copying a shared device page failed: {e}"),
        }
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        self.backend.free(self.ptr, self.bytes);
    }
}

impl fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevBuf({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl PartialEq for DevBuf {
    fn eq(&self, other: &Self) -> bool {
        self.ptr == other.ptr
    }
}

/// Free lists of page-sized blocks carved from large slabs: a page costs no driver call.
#[derive(Default)]
pub struct Pool {
    free: HashMap<usize, Vec<u64>>,
    slabs: Vec<(u64, usize)>,
}

impl Pool {
    /// Takes a block of `bytes`, carving a new slab with `slab(size)` when none is free.
    pub fn take(&mut self, bytes: usize, slab: impl FnOnce(usize) -> Result<u64>) -> Result<u64> {
        if let Some(p) = self.free.get_mut(&bytes).and_then(|v| v.pop()) {
            return Ok(p);
        }
        // 64 pages or 2 MiB, whichever is larger.
        let n = (2usize << 20).div_ceil(bytes).max(64);
        let base = slab(n * bytes)?;
        self.slabs.push((base, n * bytes));
        let list = self.free.entry(bytes).or_default();
        list.extend((1..n).rev().map(|i| base + (i * bytes) as u64));
        Ok(base)
    }
    /// Returns a block.
    pub fn give(&mut self, ptr: u64, bytes: usize) {
        self.free.entry(bytes).or_default().push(ptr);
    }
    /// Bytes held in slabs.
    pub fn reserved(&self) -> usize {
        self.slabs.iter().map(|s| s.1).sum()
    }
}

/// A tensor in device memory as its owner (torch) describes it; strides in elements.
#[derive(Clone, Copy, Debug)]
pub struct DevTensor {
    /// Device address of element `[0, 0, 0, 0]`.
    pub ptr: u64,
    /// Sizes.
    pub shape: [usize; 4],
    /// Strides in elements.
    pub strides: [usize; 4],
    /// Element type.
    pub dtype: DType,
}
