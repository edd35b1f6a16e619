//! Where device pages live and kernels run: the CUDA driver (through cudarc, loaded at run
//! time) or, for tests, the host emulation of the same kernels over host memory. The store's
//! device path is written once against [`Backend`], so CI runs all of it without a GPU.
//!
//! Streams: every call runs on the stream last given to [`Backend::set_stream`] (the Python
//! layer passes torch's current stream before each operation). Launches are raw launches on
//! that stream; nothing here creates, destroys or synchronizes streams it does not own, and
//! memory it did not allocate (torch tensors) is never freed.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::abi::*;
use crate::device::{DeviceMemory, Pool};
use crate::error::{Error, Result};

/// One kernel launch: parameters, grid and dynamic shared memory bytes.
#[derive(Clone, Copy, Debug)]
pub enum Launch<'a> {
    /// `rkv_fwht(p, scratch)`.
    Fwht(&'a RkvFwhtParams, u64, [u32; 3], usize),
    /// `rkv_append(p)`.
    Append(&'a RkvAppendParams, [u32; 3], usize),
    /// `rkv_paged_write(p)`.
    PagedWrite(&'a RkvPagedWriteParams, [u32; 3], usize),
    /// `rkv_channel_keys(p)`.
    Channel(&'a RkvChannelParams),
    /// `rkv_attend(p)`.
    Attend(&'a RkvAttendParams, [u32; 3], usize),
    /// `rkv_combine(p)`.
    Combine(&'a RkvCombineParams),
    /// `rkv_mass_lse(p)`, or `rkv_mass_keys(p)` when the flag is set.
    Mass(&'a RkvMassParams, bool, [u32; 3], usize),
}

/// A device that runs the kernels: its memory plus launches.
pub trait Backend: DeviceMemory {
    /// Queues a kernel.
    fn launch(&self, l: Launch<'_>) -> Result<()>;
}

/// The host emulation: "device" memory is host memory, launches run `cuda/emu`.
#[cfg(feature = "cuda-emu")]
#[derive(Default)]
pub struct EmuBackend {
    mem: Mutex<HashMap<u64, Vec<u64>>>,
    pool: Mutex<Pool>,
    stream: AtomicU64,
}

#[cfg(feature = "cuda-emu")]
impl fmt::Debug for EmuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EmuBackend")
    }
}

#[cfg(feature = "cuda-emu")]
impl EmuBackend {
    /// The process-wide emulated device.
    pub fn shared() -> Arc<dyn Backend> {
        static ONE: std::sync::OnceLock<Arc<dyn Backend>> = std::sync::OnceLock::new();
        ONE.get_or_init(|| Arc::new(EmuBackend::default())).clone()
    }
    fn host_alloc(&self, bytes: usize) -> u64 {
        let v = vec![0u64; bytes.div_ceil(8).max(1)];
        let p = v.as_ptr() as u64;
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p, v);
        p
    }
}

#[cfg(feature = "cuda-emu")]
impl DeviceMemory for EmuBackend {
    fn name(&self) -> String {
        "emu".into()
    }
    fn alloc(&self, bytes: usize) -> Result<u64> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let p = pool.take(bytes, |n| Ok(self.host_alloc(n)))?;
        // SAFETY: `p` is a block of `bytes` inside a live slab.
        unsafe { std::ptr::write_bytes(p as *mut u8, 0, bytes) };
        Ok(p)
    }
    fn free(&self, ptr: u64, bytes: usize) {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .give(ptr, bytes);
    }
    fn temp(&self, bytes: usize) -> Result<u64> {
        Ok(self.host_alloc(bytes))
    }
    fn free_temp(&self, ptr: u64) {
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ptr);
    }
    fn h2d(&self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: `dst` is emulated device memory of at least `src.len()` bytes (callers
        // size their buffers); the regions do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }
    fn d2h(&self, dst: &mut [u8], src: u64) -> Result<()> {
        // SAFETY: as in `h2d`, the other way.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    fn d2d(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: both are emulated device buffers of at least `bytes`; `copy` allows overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }
    fn set_stream(&self, stream: u64) {
        self.stream.store(stream, Ordering::Relaxed);
    }
    fn sm_count(&self) -> usize {
        4
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn dlpack_device(&self) -> (i32, i32) {
        (1, 0)
    }
}

#[cfg(feature = "cuda-emu")]
impl Backend for EmuBackend {
    fn launch(&self, l: Launch<'_>) -> Result<()> {
        use super::emu;
        // SAFETY: every address in the parameters is emulated device memory or caller host
        // memory standing in for device memory, sized by the code that built them.
        unsafe {
            match l {
                Launch::Fwht(p, s, g, m) => emu::fwht(p, s, g[0], m),
                Launch::Append(p, g, m) => emu::append(p, g, m),
                Launch::PagedWrite(p, g, m) => emu::paged_write(p, g, m),
                Launch::Channel(p) => emu::channel_keys(p),
                Launch::Attend(p, g, m) => emu::attend(p, g, m),
                Launch::Combine(p) => emu::combine(p),
                Launch::Mass(p, keys, g, m) => emu::mass(p, keys, g, m),
            }
        }
        Ok(())
    }
}

/// Errors of driver calls, named.
fn drv<T>(what: &str, r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| Error::device(format!("CUDA driver: {what} failed: {e}")))
}

/// A CUDA device through the driver API, on the primary context torch also uses.
pub struct CudaBackend {
    ordinal: i32,
    ctx: cudarc::driver::sys::CUcontext,
    funcs: HashMap<&'static str, cudarc::driver::sys::CUfunction>,
    pool: Mutex<Pool>,
    stream: AtomicU64,
    sms: usize,
    /// The architecture the kernels were compiled for.
    pub arch: String,
}

// SAFETY: the context and function handles are process-wide driver handles, usable from
// any thread once the context is made current (every call below does that first).
unsafe impl Send for CudaBackend {}
// SAFETY: as above; mutable state is behind a Mutex or atomics.
unsafe impl Sync for CudaBackend {}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaBackend(cuda:{}, {})", self.ordinal, self.arch)
    }
}

/// Whether the CUDA driver library can be opened (never panics).
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Visible CUDA devices (0 without a driver).
pub fn device_count() -> usize {
    use cudarc::driver::result;
    if !driver_present() || result::init().is_err() {
        return 0;
    }
    result::device::get_count().map_or(0, |n| n.max(0) as usize)
}

const KERNELS: [(&str, &str); 8] = [
    ("hadamard.cu", "rkv_fwht"),
    ("quant.cu", "rkv_append"),
    ("quant.cu", "rkv_paged_write"),
    ("quant.cu", "rkv_channel_keys"),
    ("attend.cu", "rkv_attend"),
    ("attend.cu", "rkv_combine"),
    ("saliency.cu", "rkv_mass_lse"),
    ("saliency.cu", "rkv_mass_keys"),
];

impl CudaBackend {
    /// The backend of device `ordinal`, created once per process (kernels compiled or read
    /// from the disk cache on first use).
    pub fn get(ordinal: i32) -> Result<Arc<dyn Backend>> {
        static ALL: Mutex<Vec<(i32, Arc<dyn Backend>)>> = Mutex::new(Vec::new());
        let mut all = ALL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, b)) = all.iter().find(|(o, _)| *o == ordinal) {
            return Ok(b.clone());
        }
        let b: Arc<dyn Backend> = Arc::new(Self::open(ordinal)?);
        all.push((ordinal, b.clone()));
        Ok(b)
    }

    fn open(ordinal: i32) -> Result<Self> {
        use cudarc::driver::{result, sys};
        if !driver_present() {
            return Err(Error::device(
                "device: no CUDA driver (libcuda.so.1) on this machine; use device='cpu'",
            ));
        }
        drv("cuInit", result::init())?;
        let n = drv("cuDeviceGetCount", result::device::get_count())?;
        if ordinal < 0 || ordinal >= n {
            return Err(Error::device(format!(
                "device: expected cuda:0 .. cuda:{}, got cuda:{ordinal}",
                n - 1
            )));
        }
        let dev = drv("cuDeviceGet", result::device::get(ordinal))?;
        // SAFETY: `dev` is a valid device handle; the primary context is retained for the
        // life of the process (the backend is never dropped), the same one torch uses.
        let ctx = drv("cuDevicePrimaryCtxRetain", unsafe {
            result::primary_ctx::retain(dev)
        })?;
        // SAFETY: `ctx` was just retained.
        drv("cuCtxSetCurrent", unsafe { result::ctx::set_current(ctx) })?;
        let attr = |a| {
            // SAFETY: `dev` is valid; plain attribute queries.
            drv("cuDeviceGetAttribute", unsafe {
                result::device::get_attribute(dev, a)
            })
        };
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sms = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let arch = format!("sm_{major}{minor}");
        let ptx = super::nvrtc::compile_all(&arch)?;
        let mut modules = HashMap::new();
        for (file, c) in &ptx {
            let image = std::ffi::CString::new(c.ptx.as_bytes())
                .map_err(|_| Error::device("NUL in PTX"))?;
            // SAFETY: `image` is NUL-terminated PTX; the context is current.
            let m = drv("cuModuleLoadData", unsafe {
                result::module::load_data(image.as_ptr() as *const _)
            })?;
            modules.insert(file.clone(), m);
        }
        let mut funcs = HashMap::new();
        for (file, name) in KERNELS {
            let cname = std::ffi::CString::new(name).map_err(|_| Error::device("kernel name"))?;
            // SAFETY: the module was loaded above and is never unloaded.
            let f = drv("cuModuleGetFunction", unsafe {
                result::module::get_function(modules[file], cname)
            })?;
            funcs.insert(name, f);
        }
        Ok(CudaBackend {
            ordinal,
            ctx,
            funcs,
            pool: Mutex::new(Pool::default()),
            stream: AtomicU64::new(0),
            sms,
            arch,
        })
    }

    fn current(&self) -> Result<cudarc::driver::sys::CUstream> {
        // SAFETY: the context is retained for the life of the process.
        drv("cuCtxSetCurrent", unsafe {
            cudarc::driver::result::ctx::set_current(self.ctx)
        })?;
        Ok(self.stream.load(Ordering::Relaxed) as cudarc::driver::sys::CUstream)
    }

    fn raw_launch(
        &self,
        name: &str,
        grid: [u32; 3],
        smem: usize,
        args: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        use cudarc::driver::{result, sys};
        let s = self.current()?;
        let f = self.funcs[name];
        if smem > SMEM_DEFAULT {
            // SAFETY: `f` is a live function handle; the attribute only raises its limit.
            drv("cuFuncSetAttribute", unsafe {
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            })?;
        }
        // SAFETY: `args` point at parameter values that outlive the call (the driver copies
        // them at launch); the grid and shared memory were computed for this kernel.
        drv(name, unsafe {
            result::launch_kernel(
                f,
                (grid[0], grid[1], grid[2]),
                (THREADS, 1, 1),
                smem as u32,
                s,
                args,
            )
        })
    }
}

impl DeviceMemory for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }
    fn alloc(&self, bytes: usize) -> Result<u64> {
        use cudarc::driver::result;
        let s = self.current()?;
        let p = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: a plain allocation in the current context; slabs live as long as the
            // backend (the process).
            pool.take(bytes, |n| {
                drv("cuMemAlloc", unsafe { result::malloc_sync(n) })
            })?
        };
        // SAFETY: `p` is a block of `bytes` inside a live slab.
        drv("cuMemsetD8Async", unsafe {
            result::memset_d8_async(p, 0, bytes, s)
        })?;
        Ok(p)
    }
    fn free(&self, ptr: u64, bytes: usize) {
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .give(ptr, bytes);
    }
    fn temp(&self, bytes: usize) -> Result<u64> {
        let s = self.current()?;
        // SAFETY: stream-ordered allocation on the current stream, freed on it.
        drv("cuMemAllocAsync", unsafe {
            cudarc::driver::result::malloc_async(s, bytes.max(16))
        })
    }
    fn free_temp(&self, ptr: u64) {
        if let Ok(s) = self.current() {
            // SAFETY: `ptr` came from `temp` on this stream; freed once.
            let _ = unsafe { cudarc::driver::result::free_async(ptr, s) };
        }
    }
    fn h2d(&self, dst: u64, src: &[u8]) -> Result<()> {
        let s = self.current()?;
        // SAFETY: `dst` holds at least `src.len()` bytes. From pageable memory the driver
        // stages the copy before returning, so `src` may be reused afterwards.
        drv("cuMemcpyHtoDAsync", unsafe {
            cudarc::driver::result::memcpy_htod_async(dst, src, s)
        })
    }
    fn d2h(&self, dst: &mut [u8], src: u64) -> Result<()> {
        use cudarc::driver::result;
        let s = self.current()?;
        // SAFETY: `src` holds at least `dst.len()` bytes; the stream is synchronized before
        // `dst` is read.
        drv("cuMemcpyDtoHAsync", unsafe {
            result::memcpy_dtoh_async(dst, src, s)
        })?;
        // SAFETY: the current stream handle.
        drv("cuStreamSynchronize", unsafe {
            result::stream::synchronize(s)
        })
    }
    fn d2d(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        let s = self.current()?;
        // SAFETY: both buffers hold at least `bytes`.
        drv("cuMemcpyDtoDAsync", unsafe {
            cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, s)
        })
    }
    fn set_stream(&self, stream: u64) {
        self.stream.store(stream, Ordering::Relaxed);
    }
    fn sm_count(&self) -> usize {
        self.sms
    }
    fn sync(&self) -> Result<()> {
        let s = self.current()?;
        // SAFETY: the current stream handle.
        drv("cuStreamSynchronize", unsafe {
            cudarc::driver::result::stream::synchronize(s)
        })
    }
    fn dlpack_device(&self) -> (i32, i32) {
        (2, self.ordinal)
    }
}

impl Backend for CudaBackend {
    fn launch(&self, l: Launch<'_>) -> Result<()> {
        fn arg<T>(x: &T) -> *mut std::ffi::c_void {
            x as *const T as *mut std::ffi::c_void
        }
        match l {
            Launch::Fwht(p, scratch, g, m) => {
                self.raw_launch("rkv_fwht", g, m, &mut [arg(p), arg(&scratch)])
            }
            Launch::Append(p, g, m) => self.raw_launch("rkv_append", g, m, &mut [arg(p)]),
            Launch::PagedWrite(p, g, m) => self.raw_launch("rkv_paged_write", g, m, &mut [arg(p)]),
            Launch::Channel(p) => self.raw_launch(
                "rkv_channel_keys",
                [p.n_pages as u32, p.heads as u32, 1],
                0,
                &mut [arg(p)],
            ),
            Launch::Attend(p, g, m) => self.raw_launch("rkv_attend", g, m, &mut [arg(p)]),
            Launch::Combine(p) => self.raw_launch(
                "rkv_combine",
                [(p.hq * p.tq) as u32, p.batch as u32, 1],
                p.d as usize * 4,
                &mut [arg(p)],
            ),
            Launch::Mass(p, keys, g, m) => {
                let name = if keys {
                    "rkv_mass_keys"
                } else {
                    "rkv_mass_lse"
                };
                self.raw_launch(name, g, m, &mut [arg(p)])
            }
        }
    }
}
