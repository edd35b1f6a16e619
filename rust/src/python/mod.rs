//! The PyO3 layer: the only module that imports pyo3. Thin: argument conversion, GIL release
//! and error mapping; all logic lives in the core modules.

mod buffers;
mod classes;
mod device;
mod dlpack;
mod errors;
mod paged;

use pyo3::prelude::*;

/// Runtime information for bug reports and tests.
#[pyfunction]
fn build_info() -> std::collections::HashMap<&'static str, String> {
    let mut m = std::collections::HashMap::new();
    m.insert("version", env!("CARGO_PKG_VERSION").to_string());
    m.insert("simd", format!("{:?}", crate::simd::level()).to_lowercase());
    m.insert("threads", rayon::current_num_threads().to_string());
    m
}

/// Orthonormal Walsh-Hadamard transform of the last axis of a float32 array (a reference
/// and a convenience; the store applies its rotations itself).
#[pyfunction]
#[pyo3(signature = (x, inverse=false))]
fn hadamard<'py>(
    py: Python<'py>,
    x: Bound<'py, PyAny>,
    inverse: bool,
) -> PyResult<Bound<'py, numpy::PyArrayDyn<f32>>> {
    use numpy::{PyArrayMethods, PyUntypedArrayMethods, ToPyArray};
    let arr = py
        .import("numpy")?
        .call_method1("asarray", (&x, "float32"))
        .map_err(|_| {
            errors::dtype_err(
                py,
                format!("x: expected a float array, got {}", x.get_type()),
            )
        })?;
    let x: numpy::PyReadonlyArrayDyn<'py, f32> = arr.extract()?;
    if x.ndim() == 0 {
        return Err(errors::shape_err(
            py,
            "x: expected at least one axis, got a scalar".into(),
        ));
    }
    let shape = x.shape().to_vec();
    let n = *shape.last().unwrap_or(&0);
    let h = crate::Hadamard::new(n).map_err(|e| errors::to_py(py, e))?;
    let mut data = x.as_array().iter().copied().collect::<Vec<f32>>();
    for row in data.chunks_exact_mut(n.max(1)) {
        if inverse {
            h.inverse(row)
        } else {
            h.forward(row)
        }
    }
    data.to_pyarray(py).reshape(shape)
}

/// Attention mass of a chunk's keys (`rotatekv.saliency.attention_mass` checks and converts
/// the arguments): `(mass [B, Tk], count [B, Tk], lse [B, Hq, Tq])`.
#[pyfunction]
#[pyo3(signature = (q, k, q_pos, k_pos, k_valid, prior_lse, scale, softcap, window, lag))]
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn _attention_mass<'py>(
    py: Python<'py>,
    q: numpy::PyReadonlyArray4<'py, f32>,
    k: numpy::PyReadonlyArray4<'py, f32>,
    q_pos: numpy::PyReadonlyArray2<'py, i64>,
    k_pos: numpy::PyReadonlyArray2<'py, i64>,
    k_valid: Option<numpy::PyReadonlyArray2<'py, bool>>,
    prior_lse: Option<numpy::PyReadonlyArray3<'py, f32>>,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    lag: usize,
) -> PyResult<(
    Bound<'py, numpy::PyArray2<f32>>,
    Bound<'py, numpy::PyArray2<u32>>,
    Bound<'py, numpy::PyArray3<f32>>,
)> {
    use numpy::{IntoPyArray, PyArrayMethods, PyUntypedArrayMethods};
    let contiguous =
        |name: &str| errors::shape_err(py, format!("{name}: expected a C-contiguous array"));
    let (qs, ks) = (q.shape(), k.shape());
    let dims = crate::saliency::MassDims {
        b: qs[0],
        hq: qs[1],
        tq: qs[2],
        hkv: ks[1],
        tk: ks[2],
        d: qs[3],
    };
    if ks[0] != dims.b || ks[3] != dims.d {
        return Err(errors::shape_err(
            py,
            format!(
                "k: expected [{}, Hkv, Tk, {}] (q's batch and head size), got {ks:?}",
                dims.b, dims.d
            ),
        ));
    }
    let args = crate::saliency::MassArgs {
        q: q.as_slice().map_err(|_| contiguous("q"))?,
        k: k.as_slice().map_err(|_| contiguous("k"))?,
        dims,
        q_pos: q_pos.as_slice().map_err(|_| contiguous("q_pos"))?,
        k_pos: k_pos.as_slice().map_err(|_| contiguous("k_pos"))?,
        k_valid: match &k_valid {
            Some(v) => Some(v.as_slice().map_err(|_| contiguous("k_valid"))?),
            None => None,
        },
        prior_lse: match &prior_lse {
            Some(v) => Some(v.as_slice().map_err(|_| contiguous("prior_lse"))?),
            None => None,
        },
        scale,
        softcap,
        window,
        lag,
    };
    let m = py
        .detach(|| device::guard(|| crate::saliency::attention_mass(&args)))
        .map_err(|e| errors::to_py(py, e))?;
    let (b, tk) = (dims.b, dims.tk);
    Ok((
        m.mass.into_pyarray(py).reshape([b, tk])?,
        m.count.into_pyarray(py).reshape([b, tk])?,
        m.lse.into_pyarray(py).reshape([b, dims.hq, dims.tq])?,
    ))
}

/// The package's device hooks (`rotatekv._device`: value checks of device tensors run with
/// torch, and finding torch's NVRTC), handed down when `rotatekv` is imported so that this
/// layer never imports the package back.
static HOOKS: std::sync::OnceLock<Py<PyAny>> = std::sync::OnceLock::new();

/// Registers the package's device hooks (once; later calls keep the first).
#[pyfunction]
fn _set_device_hooks(hooks: Bound<'_, PyAny>) {
    let _ = HOOKS.set(hooks.unbind());
}

/// Calls hook `name` with `args`; a device store needs the package's hooks.
pub(crate) fn call_hook<'py>(
    py: Python<'py>,
    name: &str,
    args: impl pyo3::call::PyCallArgs<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    match HOOKS.get() {
        Some(h) => h.bind(py).call_method1(name, args),
        None => Err(errors::device_err(
            py,
            "device stores are driven through the rotatekv package: import rotatekv first".into(),
        )),
    }
}

/// Loads NVRTC (and its builtins) from `dir`.
#[pyfunction]
fn _cuda_load_nvrtc(py: Python<'_>, dir: std::path::PathBuf) -> PyResult<()> {
    crate::cuda::nvrtc::load_library(&dir).map_err(|e| errors::to_py(py, e))
}

/// Whether NVRTC can be opened.
#[pyfunction]
fn _cuda_nvrtc_available() -> bool {
    crate::cuda::nvrtc::available()
}

/// NVRTC's version.
#[pyfunction]
fn _cuda_nvrtc_version(py: Python<'_>) -> PyResult<(i32, i32)> {
    crate::cuda::nvrtc::version().map_err(|e| errors::to_py(py, e))
}

/// Every kernel file compiled for `arch`: `{file: (ptx, log)}`.
#[pyfunction]
fn _cuda_compile(
    py: Python<'_>,
    arch: &str,
) -> PyResult<std::collections::BTreeMap<String, (String, String)>> {
    let res = py.detach(|| {
        crate::cuda::KERNEL_FILES
            .iter()
            .map(|(name, src)| {
                crate::cuda::nvrtc::compile_one(name, src, arch)
                    .map(|c| (name.to_string(), (c.ptx, c.log)))
            })
            .collect::<crate::Result<_>>()
    });
    res.map_err(|e| errors::to_py(py, e))
}

/// Visible CUDA devices.
#[pyfunction]
fn _cuda_device_count() -> usize {
    crate::cuda::backend::device_count()
}

/// Hadamard transform of the last axis of a device tensor (`out` preallocated, same shape
/// and dtype, both contiguous) on the backend of `device`.
#[pyfunction]
fn _cuda_hadamard(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    out: Bound<'_, PyAny>,
    device: &str,
    inverse: bool,
) -> PyResult<()> {
    let backend = device::backend_for(py, device)?
        .ok_or_else(|| errors::device_err(py, "device: expected a device, got 'cpu'".into()))?;
    let name = backend.name();
    let xt = device::dev_tensor(&x, "x", &name)?;
    let ot = device::dev_tensor(&out, "out", &name)?;
    let n = xt.shape[3];
    if !crate::hadamard::supported(n) {
        return Err(errors::arg_err(
            py,
            format!("x: expected a last axis of 2^k (k <= 15) or 12/20/28 * 2^k, got {n}"),
        ));
    }
    let rows: usize = xt.shape[..3].iter().product();
    device::use_torch_stream(py, &backend)?;
    let res = py.detach(|| {
        device::guard(|| crate::cuda::launch::fwht(&backend, &xt, &ot, rows, n, inverse))
    });
    res.map_err(|e| errors::to_py(py, e))
}

/// Attention mass on a device (`rotatekv.saliency` allocates the outputs and checks the
/// arguments): fills `lse [B, Hq, Tq]`, `mass [B, Tk]` and `count [B, Tk]`.
#[pyfunction]
#[pyo3(signature = (device, q, k, q_pos, k_pos, k_valid, prior, lse, mass, count, scale, softcap, window, lag))]
#[allow(clippy::too_many_arguments)]
fn _cuda_attention_mass(
    py: Python<'_>,
    device: &str,
    q: Bound<'_, PyAny>,
    k: Bound<'_, PyAny>,
    q_pos: Bound<'_, PyAny>,
    k_pos: Bound<'_, PyAny>,
    k_valid: Option<Bound<'_, PyAny>>,
    prior: Option<Bound<'_, PyAny>>,
    lse: Bound<'_, PyAny>,
    mass: Bound<'_, PyAny>,
    count: Bound<'_, PyAny>,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    lag: usize,
) -> PyResult<()> {
    let backend = device::backend_for(py, device)?
        .ok_or_else(|| errors::device_err(py, "device: expected a device, got 'cpu'".into()))?;
    let name = backend.name();
    let (b, hq, tq, d) = {
        let s: Vec<usize> = q.getattr("shape")?.extract()?;
        if s.len() != 4 {
            return Err(errors::shape_err(
                py,
                format!("q: expected [B, Hq, Tq, D], got {s:?}"),
            ));
        }
        (s[0], s[1], s[2], s[3])
    };
    let ks: Vec<usize> = k.getattr("shape")?.extract()?;
    if ks.len() != 4 || ks[0] != b || ks[3] != d {
        return Err(errors::shape_err(
            py,
            format!("k: expected [{b}, Hkv, Tk, {d}] (q's batch and head size), got {ks:?}"),
        ));
    }
    let (hkv, tk) = (ks[1], ks[2]);
    let f32s = "torch.float32";
    let ptr = |o: &Bound<'_, PyAny>, arg: &str, dtype: &str, n: usize| {
        device::raw_tensor(o, arg, &name, dtype, n)
    };
    let buf = crate::cuda::launch::MassBuffers {
        q: ptr(&q, "q", f32s, b * hq * tq * d)?,
        k: ptr(&k, "k", f32s, b * hkv * tk * d)?,
        q_pos: ptr(&q_pos, "q_pos", "torch.int64", b * tq)?,
        k_pos: ptr(&k_pos, "k_pos", "torch.int64", b * tk)?,
        k_valid: match &k_valid {
            Some(v) => ptr(v, "k_valid", "torch.uint8", b * tk)?,
            None => 0,
        },
        prior: match &prior {
            Some(v) => ptr(v, "prior_lse", f32s, b * hq * tq)?,
            None => 0,
        },
        lse: ptr(&lse, "lse", f32s, b * hq * tq)?,
        mass: ptr(&mass, "mass", f32s, b * tk)?,
        count: ptr(&count, "count", "torch.int32", b * tk)?,
    };
    let dims = crate::saliency::MassDims {
        b,
        hq,
        tq,
        hkv,
        tk,
        d,
    };
    device::use_torch_stream(py, &backend)?;
    let res = py.detach(|| {
        device::guard(|| {
            crate::cuda::launch::attention_mass(&backend, &buf, dims, scale, softcap, window, lag)
        })
    });
    res.map_err(|e| errors::to_py(py, e))
}

#[pymodule]
fn _rotatekv(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add_class::<classes::PyPlan>()?;
    m.add_class::<classes::PyStore>()?;
    m.add_class::<classes::PyPageBuffer>()?;
    paged::register(m)?;
    // The precision classes, from the one format table (Python derives its checks from it).
    m.add("_CLASS_BITS", crate::format::CLASS_BITS.to_vec())?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add_function(wrap_pyfunction!(hadamard, m)?)?;
    m.add_function(wrap_pyfunction!(_attention_mass, m)?)?;
    m.add_function(wrap_pyfunction!(_set_device_hooks, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_load_nvrtc, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_nvrtc_available, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_compile, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_hadamard, m)?)?;
    m.add_function(wrap_pyfunction!(_cuda_attention_mass, m)?)?;
    Ok(())
}
