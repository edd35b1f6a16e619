//! Device stores from Python: picking a backend for `device=...`, describing torch tensors
//! in device memory (address, shape, strides; nothing is copied), passing torch's current
//! stream, and keeping panics (a failed device copy inside copy-on-write) from reaching
//! Python.

use std::sync::Arc;

use pyo3::prelude::*;

use super::errors::{device_err, dtype_err, shape_err, to_py};
use crate::cuda::backend::{Backend, CudaBackend};
use crate::device::DevTensor;
use crate::tensor::DType;

/// The backend of a `device` argument: `None` for `"cpu"`.
pub fn backend_for(py: Python<'_>, device: &str) -> PyResult<Option<Arc<dyn Backend>>> {
    match device {
        "cpu" => Ok(None),
        "emu" => {
            #[cfg(feature = "cuda-emu")]
            {
                Ok(Some(crate::cuda::backend::EmuBackend::shared()))
            }
            #[cfg(not(feature = "cuda-emu"))]
            {
                Err(device_err(
                    py,
                    "device: 'emu' (host emulation of the CUDA kernels) is not in this build"
                        .into(),
                ))
            }
        }
        d if d == "cuda" || d.starts_with("cuda:") => {
            let ordinal: i32 = match d.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse().map_err(|_| {
                    device_err(
                        py,
                        format!("device: expected 'cuda' or 'cuda:N', got {d:?}"),
                    )
                })?,
            };
            // NVRTC from torch's wheels is not on the library path: the package finds it.
            super::call_hook(py, "load_nvrtc", ())?;
            let b = py.detach(|| guard(|| CudaBackend::get(ordinal)));
            b.map(Some).map_err(|e| to_py(py, e))
        }
        other => Err(device_err(
            py,
            format!("device: expected 'cpu', 'cuda', 'cuda:N' or 'emu', got {other:?}"),
        )),
    }
}

/// Runs `f`, turning a panic into a device error.
pub fn guard<T>(f: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "internal error".into());
            Err(crate::Error::device(msg))
        }
    }
}

/// The torch device string a store's tensors must be on (`"emu"` stores take CPU tensors).
fn torch_device(store_device: &str) -> String {
    match store_device {
        "emu" => "cpu".into(),
        "cuda" => "cuda:0".into(),
        d => d.into(),
    }
}

/// Checks that `obj` is a torch tensor on `store_device`'s torch device.
pub fn check_on_device(obj: &Bound<'_, PyAny>, arg: &str, store_device: &str) -> PyResult<()> {
    let py = obj.py();
    let is_tensor = obj
        .get_type()
        .module()
        .map(|m| m.to_string().starts_with("torch"))
        .unwrap_or(false)
        && obj.hasattr("data_ptr")?;
    if !is_tensor {
        return Err(dtype_err(
            py,
            format!(
                "{arg}: expected a torch.Tensor on {store_device}, got {}",
                obj.get_type().name()?
            ),
        ));
    }
    let dev = obj.getattr("device")?;
    let mut dev_s: String = dev.str()?.extract()?;
    if dev_s == "cuda" {
        dev_s = format!(
            "cuda:{}",
            dev.getattr("index")?.extract::<Option<i64>>()?.unwrap_or(0)
        );
    }
    let want = torch_device(store_device);
    if dev_s != want {
        return Err(device_err(
            py,
            format!("{arg}: expected a tensor on {want} (the store's device), got {dev_s}"),
        ));
    }
    Ok(())
}

/// Describes a torch tensor on the store's device, `[d0, d1, d2, d3]`.
pub fn dev_tensor(obj: &Bound<'_, PyAny>, arg: &str, store_device: &str) -> PyResult<DevTensor> {
    let py = obj.py();
    check_on_device(obj, arg, store_device)?;
    let dtype = match obj.getattr("dtype")?.str()?.to_str()? {
        "torch.float32" => DType::F32,
        "torch.float16" => DType::F16,
        "torch.bfloat16" => DType::BF16,
        other => {
            return Err(dtype_err(
                py,
                format!("{arg}: expected dtype float32, float16 or bfloat16, got {other}"),
            ))
        }
    };
    let shape: Vec<i64> = obj.getattr("shape")?.extract()?;
    if shape.len() != 4 {
        return Err(shape_err(
            py,
            format!("{arg}: expected 4 dimensions, got shape {shape:?}"),
        ));
    }
    let strides: Vec<i64> = obj.call_method0("stride")?.extract()?;
    if strides.iter().any(|s| *s < 0) {
        return Err(shape_err(
            py,
            format!("{arg}: expected non-negative strides, got {strides:?}"),
        ));
    }
    let ptr: u64 = obj.call_method0("data_ptr")?.extract()?;
    let u = |v: &[i64]| [v[0] as usize, v[1] as usize, v[2] as usize, v[3] as usize];
    Ok(DevTensor {
        ptr,
        shape: u(&shape),
        strides: u(&strides),
        dtype,
    })
}

/// The address of a contiguous torch tensor of `numel` elements of `dtype` (a torch dtype
/// name such as `"torch.int64"`) on `store_device`: arrays that are not 4-D float tensors.
pub fn raw_tensor(
    obj: &Bound<'_, PyAny>,
    arg: &str,
    store_device: &str,
    dtype: &str,
    numel: usize,
) -> PyResult<u64> {
    let py = obj.py();
    check_on_device(obj, arg, store_device)?;
    let got: String = obj.getattr("dtype")?.str()?.extract()?;
    if got != dtype {
        return Err(dtype_err(py, format!("{arg}: expected {dtype}, got {got}")));
    }
    let n: usize = obj.call_method0("numel")?.extract()?;
    let contiguous: bool = obj.call_method0("is_contiguous")?.extract()?;
    if n != numel || !contiguous {
        return Err(shape_err(
            py,
            format!("{arg}: expected a contiguous tensor of {numel} elements, got {n}"),
        ));
    }
    obj.call_method0("data_ptr")?.extract()
}

/// Makes the backend run on torch's current stream of the store's device.
pub fn use_torch_stream(py: Python<'_>, backend: &Arc<dyn Backend>) -> PyResult<()> {
    let name = backend.name();
    let Some(idx) = name.strip_prefix("cuda:") else {
        backend.set_stream(0);
        return Ok(());
    };
    let idx: i64 = idx.parse().unwrap_or(0);
    let s = py
        .import("torch")?
        .getattr("cuda")?
        .call_method1("current_stream", (idx,))?
        .getattr("cuda_stream")?
        .extract::<u64>()?;
    backend.set_stream(s);
    Ok(())
}
