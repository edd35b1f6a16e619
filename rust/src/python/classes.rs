//! The Python classes: `RotationPlan`, `KVStore`, `PageBuffer`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use numpy::{PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods, ToPyArray};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use super::buffers::{borrow, Borrow};
use super::device::{backend_for, dev_tensor, guard, use_torch_stream};
use super::dlpack::export_page;
use super::errors::{arg_err, dtype_err, shape_err, to_py};
use crate::attend::AttendArgs;
use crate::config::{check_store_shape, KeyLayout, QuantConfig};
use crate::format::{class_of, classes_str, FpFormat};
use crate::page::Page;
use crate::rope::Rope;
use crate::rotation::{Mode, RotationPlan};
use crate::store::{AppendArgs, KVStore};

pub(super) fn rk<T>(py: Python<'_>, r: crate::Result<T>) -> PyResult<T> {
    r.map_err(|e| to_py(py, e))
}

/// A per-layer rotation plan (see the crate docs of `rotation`).
#[pyclass(name = "RotationPlan", module = "rotatekv", frozen, eq, from_py_object)]
#[derive(Clone, PartialEq)]
pub struct PyPlan {
    /// The plan.
    pub inner: RotationPlan,
}

pub(super) fn int_array<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    arg: &str,
) -> PyResult<(Vec<i64>, Vec<usize>)> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj,)).map_err(|_| {
        dtype_err(
            py,
            format!("{arg}: expected an integer array, got {}", obj.get_type()),
        )
    })?;
    let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
    if kind != "i" && kind != "u" {
        return Err(dtype_err(
            py,
            format!(
                "{arg}: expected integers, got dtype {}",
                arr.getattr("dtype")?
            ),
        ));
    }
    let arr = np.call_method1("ascontiguousarray", (arr, "int64"))?;
    let a: PyReadonlyArrayDyn<'py, i64> = arr.extract()?;
    let shape = a.shape().to_vec();
    Ok((a.as_slice()?.to_vec(), shape))
}

fn bool_array<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    arg: &str,
) -> PyResult<(Vec<bool>, Vec<usize>)> {
    let np = py.import("numpy")?;
    let arr = np.call_method1("asarray", (obj,)).map_err(|_| {
        dtype_err(
            py,
            format!("{arg}: expected a bool array, got {}", obj.get_type()),
        )
    })?;
    let kind: String = arr.getattr("dtype")?.getattr("kind")?.extract()?;
    if kind != "b" {
        return Err(dtype_err(
            py,
            format!(
                "{arg}: expected a bool array, got dtype {}",
                arr.getattr("dtype")?
            ),
        ));
    }
    let arr = np.call_method1("ascontiguousarray", (arr,))?;
    let a: PyReadonlyArrayDyn<'py, bool> = arr.extract()?;
    let shape = a.shape().to_vec();
    Ok((a.as_slice()?.to_vec(), shape))
}

pub(super) fn float_list(py: Python<'_>, obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Vec<f32>> {
    let np = py.import("numpy")?;
    let arr = np
        .call_method1("asarray", (obj,))
        .and_then(|a| a.call_method1("astype", ("float64",)))
        .map_err(|_| {
            dtype_err(
                py,
                format!("{arg}: expected a 1-D float array, got {}", obj.get_type()),
            )
        })?;
    let v: Vec<f64> = arr
        .call_method0("ravel")?
        .call_method0("tolist")?
        .extract()?;
    Ok(v.into_iter().map(|x| x as f32).collect())
}

fn dim(py: Python<'_>, name: &str, v: i64, max: i64) -> PyResult<usize> {
    if v <= 0 || v > max {
        return Err(arg_err(
            py,
            format!("{name}: expected 1 <= {name} <= {max}, got {v}"),
        ));
    }
    Ok(v as usize)
}

fn dims(py: Python<'_>, l: i64, h: i64, d: i64) -> PyResult<(usize, usize, usize)> {
    Ok((
        dim(py, "num_layers", l, 1 << 16)?,
        dim(py, "num_kv_heads", h, 4096)?,
        dim(py, "head_dim", d, 4096)?,
    ))
}

#[pymethods]
impl PyPlan {
    /// A plan from explicit fields (what calibration produces).
    #[new]
    #[pyo3(signature = (num_layers, num_kv_heads, head_dim, *, mode="pre_rope", group_heads=1, rotate_values=true, key_perm=None, key_clip=None, value_clip=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        num_layers: i64,
        num_kv_heads: i64,
        head_dim: i64,
        mode: &str,
        group_heads: i64,
        rotate_values: bool,
        key_perm: Option<Bound<'_, PyAny>>,
        key_clip: Option<Bound<'_, PyAny>>,
        value_clip: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let (num_layers, num_kv_heads, head_dim) = dims(py, num_layers, num_kv_heads, head_dim)?;
        let group_heads = dim(py, "group_heads", group_heads, 4096)?;
        let mode = rk(py, Mode::parse(mode))?;
        let total = num_kv_heads * head_dim;
        let n = group_heads.max(1) * head_dim;
        let key_perm = match key_perm {
            None => vec![crate::rotation::identity_perm(total, n); num_layers],
            Some(p) => {
                let (v, shape) = int_array(py, &p, "key_perm")?;
                if shape != [num_layers, total] {
                    return Err(shape_err(
                        py,
                        format!("key_perm: expected shape [{num_layers}, {total}], got {shape:?}"),
                    ));
                }
                if v.iter().any(|&x| x < 0 || x > u32::MAX as i64) {
                    return Err(arg_err(
                        py,
                        "key_perm: expected entries in 0..group_heads*head_dim".into(),
                    ));
                }
                v.chunks(total.max(1))
                    .map(|c| c.iter().map(|&x| x as u32).collect())
                    .collect()
            }
        };
        let clips = |c: Option<Bound<'_, PyAny>>, name: &str| -> PyResult<Vec<f32>> {
            match c {
                None => Ok(vec![1.0; num_layers]),
                Some(c) => {
                    if let Ok(x) = c.extract::<f64>() {
                        return Ok(vec![x as f32; num_layers]);
                    }
                    float_list(py, &c, name)
                }
            }
        };
        let inner = RotationPlan {
            num_layers,
            num_kv_heads,
            head_dim,
            group_heads,
            mode,
            rotate_values,
            key_perm,
            key_clip: clips(key_clip, "key_clip")?,
            value_clip: clips(value_clip, "value_clip")?,
        };
        rk(py, inner.validate())?;
        Ok(PyPlan { inner })
    }

    /// No rotation and no RoPE inside the store.
    #[staticmethod]
    fn identity(
        py: Python<'_>,
        num_layers: i64,
        num_kv_heads: i64,
        head_dim: i64,
    ) -> PyResult<Self> {
        let (num_layers, num_kv_heads, head_dim) = dims(py, num_layers, num_kv_heads, head_dim)?;
        Ok(PyPlan {
            inner: rk(
                py,
                RotationPlan::identity(num_layers, num_kv_heads, head_dim),
            )?,
        })
    }

    /// Plain (grouped) Hadamard rotation with identity permutations.
    #[staticmethod]
    #[pyo3(signature = (num_layers, num_kv_heads, head_dim, mode="pre_rope", group_heads=None, rotate_values=true))]
    fn hadamard(
        py: Python<'_>,
        num_layers: i64,
        num_kv_heads: i64,
        head_dim: i64,
        mode: &str,
        group_heads: Option<i64>,
        rotate_values: bool,
    ) -> PyResult<Self> {
        let (num_layers, num_kv_heads, head_dim) = dims(py, num_layers, num_kv_heads, head_dim)?;
        let group_heads = group_heads
            .map(|g| dim(py, "group_heads", g, 4096))
            .transpose()?;
        let mode = rk(py, Mode::parse(mode))?;
        let inner = rk(
            py,
            RotationPlan::hadamard(
                num_layers,
                num_kv_heads,
                head_dim,
                mode,
                group_heads,
                rotate_values,
            ),
        )?;
        Ok(PyPlan { inner })
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers
    }
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.inner.num_kv_heads
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.head_dim
    }
    #[getter]
    fn group_heads(&self) -> usize {
        self.inner.group_heads
    }
    #[getter]
    fn mode(&self) -> &'static str {
        self.inner.mode.as_str()
    }
    #[getter]
    fn rotate_values(&self) -> bool {
        self.inner.rotate_values
    }
    /// `int32 [num_layers, num_kv_heads * head_dim]`.
    #[getter]
    fn key_perm<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let flat: Vec<i32> = self
            .inner
            .key_perm
            .iter()
            .flatten()
            .map(|&x| x as i32)
            .collect();
        let total = self.inner.num_kv_heads * self.inner.head_dim;
        Ok(flat
            .to_pyarray(py)
            .reshape([self.inner.num_layers, total])?
            .into_any())
    }
    #[getter]
    fn key_clip(&self) -> Vec<f32> {
        self.inner.key_clip.clone()
    }
    #[getter]
    fn value_clip(&self) -> Vec<f32> {
        self.inner.value_clip.clone()
    }

    /// Writes the plan (safetensors, atomically); `metadata` is stored beside the settings.
    #[pyo3(signature = (path, metadata=None))]
    fn save(
        &self,
        py: Python<'_>,
        path: PathBuf,
        metadata: Option<HashMap<String, String>>,
    ) -> PyResult<()> {
        rk(py, self.inner.save(&path, &metadata.unwrap_or_default()))
    }

    /// Reads a plan; given dimensions must match the file's.
    #[staticmethod]
    #[pyo3(signature = (path, num_layers=None, num_kv_heads=None, head_dim=None))]
    fn load(
        py: Python<'_>,
        path: PathBuf,
        num_layers: Option<usize>,
        num_kv_heads: Option<usize>,
        head_dim: Option<usize>,
    ) -> PyResult<Self> {
        Ok(Self::load_with_metadata(py, path, num_layers, num_kv_heads, head_dim)?.0)
    }

    /// Reads a plan and its metadata.
    #[staticmethod]
    #[pyo3(signature = (path, num_layers=None, num_kv_heads=None, head_dim=None))]
    fn load_with_metadata(
        py: Python<'_>,
        path: PathBuf,
        num_layers: Option<usize>,
        num_kv_heads: Option<usize>,
        head_dim: Option<usize>,
    ) -> PyResult<(Self, HashMap<String, String>)> {
        let (plan, meta) = rk(py, RotationPlan::load(&path))?;
        for (name, want, got) in [
            ("num_layers", num_layers, plan.num_layers),
            ("num_kv_heads", num_kv_heads, plan.num_kv_heads),
            ("head_dim", head_dim, plan.head_dim),
        ] {
            if let Some(w) = want {
                if w != got {
                    return Err(super::errors::raise(
                        py,
                        3,
                        format!(
                            "{}: the plan was made for {name} = {got}, not {w}",
                            path.display()
                        ),
                    ));
                }
            }
        }
        Ok((PyPlan { inner: plan }, meta))
    }

    fn __repr__(&self) -> String {
        let p = &self.inner;
        format!(
            "RotationPlan(num_layers={}, num_kv_heads={}, head_dim={}, mode='{}', group_heads={}, rotate_values={})",
            p.num_layers,
            p.num_kv_heads,
            p.head_dim,
            p.mode.as_str(),
            p.group_heads,
            if p.rotate_values { "True" } else { "False" }
        )
    }
}

/// A zero-copy view of one page's bytes (`torch.from_dlpack(buf)` or `numpy.from_dlpack`).
/// Read only: the store may share the page; writing through the view corrupts the store.
#[pyclass(name = "PageBuffer", module = "rotatekv", frozen)]
pub struct PyPageBuffer {
    page: Arc<Page>,
    #[pyo3(get)]
    bits: u8,
    #[pyo3(get)]
    capacity: usize,
    #[pyo3(get)]
    start: usize,
    #[pyo3(get)]
    length: usize,
    #[pyo3(get)]
    window: bool,
    layout: HashMap<String, usize>,
}

#[pymethods]
impl PyPageBuffer {
    /// DLPack export (CPU, uint8, 1-D); the page stays alive while the capsule or the
    /// consumer's tensor does.
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<Bound<'py, PyAny>>,
        dl_device: Option<Bound<'py, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = (max_version, dl_device);
        if copy == Some(true) {
            return Err(arg_err(
                py,
                "copy: PageBuffer exports only zero-copy views".into(),
            ));
        }
        if let (Some(d), Some(s)) = (&self.page.dev, &stream) {
            // The consumer reads on its stream: let every queued write to the page finish
            // first (conservative, and correct for any stream it names).
            let _ = s;
            rk(py, d.backend.sync())?;
        }
        export_page(py, self.page.clone())
    }
    fn __dlpack_device__(&self) -> (i32, i32) {
        self.page
            .dev
            .as_ref()
            .map_or((1, 0), |d| d.backend.dlpack_device())
    }
    /// Byte offsets of the sections (see docs/format.md's layout table).
    #[getter]
    fn layout(&self) -> HashMap<String, usize> {
        self.layout.clone()
    }
    /// Bytes of the page.
    #[getter]
    fn nbytes(&self) -> usize {
        self.page.nbytes()
    }
    /// Holders of the page's memory: this buffer, the store while it keeps the page, and
    /// each live DLPack export. Shows that exports release the page when their consumer goes.
    #[getter]
    fn owners(&self) -> usize {
        Arc::strong_count(&self.page)
    }
}

/// The packed KV store.
#[pyclass(name = "KVStore", module = "rotatekv", frozen)]
pub struct PyStore {
    inner: RwLock<KVStore>,
}

fn cfg_from(py: Python<'_>, config: Option<&Bound<'_, PyAny>>) -> PyResult<QuantConfig> {
    let mut cfg = QuantConfig::default();
    let Some(c) = config else { return Ok(cfg) };
    const FIELDS: [&str; 10] = [
        "bits",
        "key_bits",
        "value_bits",
        "group_size",
        "key_clip",
        "value_clip",
        "residual",
        "key_layout",
        "page_tokens",
        "fp_format",
    ];
    let dict = c.cast::<PyDict>().ok();
    if let Some(d) = dict {
        for key in d.keys() {
            let k: String = key
                .extract()
                .map_err(|_| arg_err(py, "config: expected str keys".into()))?;
            if !FIELDS.contains(&k.as_str()) {
                return Err(arg_err(
                    py,
                    format!("config: expected keys among {FIELDS:?}, got {k:?}"),
                ));
            }
        }
    }
    let get = |name: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        let v = match dict {
            Some(d) => d.get_item(name)?,
            None if c.hasattr(name)? => Some(c.getattr(name)?),
            None => None,
        };
        Ok(v.filter(|v| !v.is_none()))
    };
    let wrong = |name: &str, want: &str, v: &Bound<'_, PyAny>| {
        arg_err(
            py,
            format!(
                "config.{name}: expected {want}, got {}",
                v.repr().map(|r| r.to_string()).unwrap_or_default()
            ),
        )
    };
    // `key_bits` overrides `bits` (the default class is named by its key width);
    // `value_bits` gives that class's values their own width.
    let classes = format!("one of {}", classes_str());
    let width = |name: &str, v: &Bound<'_, PyAny>| -> PyResult<u8> {
        let b: i64 = v.extract().map_err(|_| wrong(name, "an int", v))?;
        u8::try_from(b)
            .ok()
            .filter(|b| class_of(*b).is_some())
            .ok_or_else(|| wrong(name, &classes, v))
    };
    if let Some(v) = get("bits")? {
        cfg.bits = width("bits", &v)?;
    }
    if let Some(v) = get("key_bits")? {
        cfg.bits = width("key_bits", &v)?;
    }
    if let Some(v) = get("value_bits")? {
        cfg.value_bits = Some(width("value_bits", &v)?);
    }
    if let Some(v) = get("group_size")? {
        let g: i64 = v
            .extract()
            .map_err(|_| wrong("group_size", "an int or None", &v))?;
        if g <= 0 {
            return Err(wrong("group_size", "a positive int", &v));
        }
        cfg.group_size = Some(g as usize);
    }
    for (name, slot) in [
        ("key_clip", &mut cfg.key_clip),
        ("value_clip", &mut cfg.value_clip),
    ] {
        if let Some(v) = get(name)? {
            *slot = Some(
                v.extract::<f64>()
                    .map_err(|_| wrong(name, "a float or None", &v))? as f32,
            );
        }
    }
    if let Some(v) = get("residual")? {
        let r: i64 = v
            .extract()
            .map_err(|_| wrong("residual", "an int >= 0", &v))?;
        if r < 0 {
            return Err(wrong("residual", "an int >= 0", &v));
        }
        cfg.residual = r as usize;
    }
    if let Some(v) = get("key_layout")? {
        let s: String = v.extract().map_err(|_| wrong("key_layout", "a str", &v))?;
        cfg.key_layout = rk(py, KeyLayout::parse(&s))?;
    }
    if let Some(v) = get("page_tokens")? {
        let p: i64 = v
            .extract()
            .map_err(|_| wrong("page_tokens", "32 or 64", &v))?;
        cfg.page_tokens = Some(p.max(0) as usize);
    }
    if let Some(v) = get("fp_format")? {
        let s: String = v.extract().map_err(|_| wrong("fp_format", "a str", &v))?;
        cfg.fp_format = match s.as_str() {
            "float16" => FpFormat::F16,
            "bfloat16" => FpFormat::BF16,
            _ => return Err(wrong("fp_format", "'float16' or 'bfloat16'", &v)),
        };
    }
    Ok(cfg)
}

/// Per-token arguments of an append, read and shape-checked: positions, protect, valid,
/// bits.
#[allow(clippy::type_complexity)]
fn token_arrays(
    py: Python<'_>,
    [positions, protect, valid, bits]: [&Option<Bound<'_, PyAny>>; 4],
    batch: usize,
    t: usize,
) -> PyResult<(
    Option<Vec<i64>>,
    Option<Vec<bool>>,
    Option<Vec<bool>>,
    Option<Vec<u8>>,
)> {
    let pos = match positions {
        None => None,
        Some(p) => {
            let (v, shape) = int_array(py, p, "positions")?;
            check_2d(py, "positions", &shape, batch, t, true)?;
            Some(v)
        }
    };
    let mask = |o: &Option<Bound<'_, PyAny>>, name: &str| -> PyResult<Option<Vec<bool>>> {
        match o {
            None => Ok(None),
            Some(p) => {
                let (v, shape) = bool_array(py, p, name)?;
                check_2d(py, name, &shape, batch, t, false)?;
                Ok(Some(v))
            }
        }
    };
    let (prot, val) = (mask(protect, "protect")?, mask(valid, "valid")?);
    let bts = match bits {
        None => None,
        Some(p) => {
            let (v, shape) = int_array(py, p, "bits")?;
            check_2d(py, "bits", &shape, batch, t, false)?;
            let known = |x: i64| u8::try_from(x).ok().and_then(class_of).is_some();
            if let Some(x) = v.iter().find(|x| !known(**x)) {
                return Err(arg_err(
                    py,
                    format!("bits: expected values in {{{}}}, got {x}", classes_str()),
                ));
            }
            Some(v.iter().map(|&x| x as u8).collect())
        }
    };
    Ok((pos, prot, val, bts))
}

/// A torch tensor moved to the CPU (small per-token arguments of device calls), or `o`.
fn host<'py>(o: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let on_device = o.hasattr("is_cuda")? && o.getattr("is_cuda")?.extract::<bool>()?;
    if on_device {
        o.call_method0("cpu")
    } else {
        Ok(o.clone())
    }
}

impl PyStore {
    fn append_device<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        backend: std::sync::Arc<dyn crate::cuda::backend::Backend>,
        (k, v): (&Bound<'py, PyAny>, &Bound<'py, PyAny>),
        [positions, protect, valid, bits]: [&Option<Bound<'py, PyAny>>; 4],
    ) -> PyResult<()> {
        let name = backend.name();
        let kd = dev_tensor(k, "k", &name)?;
        let vd = dev_tensor(v, "v", &name)?;
        let (batch, t) = (kd.shape[0], kd.shape[2]);
        let host_opt = |o: &Option<Bound<'py, PyAny>>| o.as_ref().map(host).transpose();
        let (positions, protect, valid, bits) = (
            host_opt(positions)?,
            host_opt(protect)?,
            host_opt(valid)?,
            host_opt(bits)?,
        );
        let (pos, prot, val, bts) =
            token_arrays(py, [&positions, &protect, &valid, &bits], batch, t)?;
        let (fp, default_bits) = {
            let s = self.read();
            (s.meta.cfg.fp_format.as_str(), s.meta.cfg.bits)
        };
        // Value checks run on the device (torch), before anything changes.
        if kd.shape == vd.shape && kd.shape[1] == self.read().meta.heads {
            super::call_hook(
                py,
                "check_values",
                (k, v, &valid, &protect, &bits, fp, default_bits),
            )?;
        }
        let args = crate::store::DevAppendArgs {
            k: kd,
            v: vd,
            tokens: crate::store::TokenArgs {
                positions: pos.as_deref(),
                protect: prot.as_deref(),
                valid: val.as_deref(),
                bits: bts.as_deref(),
            },
        };
        use_torch_stream(py, &backend)?;
        let res = py.detach(|| guard(|| self.write().append_device(layer, &args)));
        rk(py, res)
    }

    /// For a device store, makes later device work run on torch's current stream.
    fn on_torch_stream(&self, py: Python<'_>) -> PyResult<()> {
        let b = self.read().dev.as_ref().map(|d| d.backend.clone());
        match b {
            Some(b) => use_torch_stream(py, &b),
            None => Ok(()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KVStore> {
        // A panic while holding the lock is impossible by construction; recover anyway.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, KVStore> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn check_2d(
    py: Python<'_>,
    arg: &str,
    shape: &[usize],
    b: usize,
    t: usize,
    allow_1d: bool,
) -> PyResult<()> {
    let ok = shape == [b, t] || (allow_1d && shape == [t]);
    if !ok {
        let want = if allow_1d {
            format!("[B={b}, T={t}] or [T={t}]")
        } else {
            format!("[B={b}, T={t}]")
        };
        return Err(shape_err(
            py,
            format!("{arg}: expected shape {want}, got {shape:?}"),
        ));
    }
    Ok(())
}

fn new_output<'py>(
    py: Python<'py>,
    like: &Borrow<'py>,
    like_obj: &Bound<'py, PyAny>,
    shape: [usize; 4],
) -> PyResult<Bound<'py, PyAny>> {
    if like.is_torch {
        like_obj.call_method1("new_empty", (PyTuple::new(py, shape)?,))
    } else {
        let dt = like_obj.getattr("dtype")?;
        py.import("numpy")?
            .call_method1("empty", (PyTuple::new(py, shape)?, dt))
    }
}

/// An int argument as `i64`, or a rotatekv error naming it: `DTypeError` for a non-int,
/// `ArgumentError` for an int beyond 64 bits (pyo3's own would be a bare `TypeError` or
/// `OverflowError`, outside the `RotateKVError` family).
fn int_named(o: &Bound<'_, PyAny>, name: &str) -> PyResult<i64> {
    let py = o.py();
    match o.extract::<i64>() {
        Ok(v) => Ok(v),
        Err(_) if o.hasattr("__index__").unwrap_or(false) => Err(arg_err(
            py,
            format!("{name}: expected an int within 64 bits, got {}", o.repr()?),
        )),
        Err(_) => Err(dtype_err(
            py,
            format!("{name}: expected an int, got {}", o.get_type().name()?),
        )),
    }
}

fn opt_int_named(o: &Bound<'_, PyAny>, name: &str) -> PyResult<Option<i64>> {
    if o.is_none() {
        Ok(None)
    } else {
        int_named(o, name).map(Some)
    }
}

fn layer_arg(o: &Bound<'_, PyAny>) -> PyResult<i64> {
    int_named(o, "layer")
}
fn seq_arg(o: &Bound<'_, PyAny>) -> PyResult<i64> {
    int_named(o, "seq")
}
fn window_arg(o: &Bound<'_, PyAny>) -> PyResult<Option<i64>> {
    opt_int_named(o, "window")
}
fn lag_arg(o: &Bound<'_, PyAny>) -> PyResult<i64> {
    int_named(o, "lag")
}
fn max_tokens_obj(o: &Bound<'_, PyAny>) -> PyResult<Option<i64>> {
    opt_int_named(o, "max_tokens")
}

fn max_tokens_arg(py: Python<'_>, v: Option<i64>) -> PyResult<Option<usize>> {
    match v {
        Some(n) if n <= 0 => Err(arg_err(
            py,
            format!("max_tokens: expected a positive int or None, got {n}"),
        )),
        v => Ok(v.map(|n| n as usize)),
    }
}

#[pymethods]
impl PyStore {
    #[new]
    #[pyo3(signature = (num_layers, num_kv_heads, head_dim, batch_size=1, config=None, plan=None, rope_inv_freq=None, rope_scaling=1.0, device="cpu", max_tokens=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        num_layers: i64,
        num_kv_heads: i64,
        head_dim: i64,
        batch_size: i64,
        config: Option<Bound<'_, PyAny>>,
        plan: Option<Bound<'_, PyAny>>,
        rope_inv_freq: Option<Bound<'_, PyAny>>,
        rope_scaling: f64,
        device: &str,
        #[pyo3(from_py_with = max_tokens_obj)] max_tokens: Option<i64>,
    ) -> PyResult<Self> {
        let backend = backend_for(py, device)?;
        for (name, v) in [
            ("num_layers", num_layers),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("batch_size", batch_size),
        ] {
            if v <= 0 {
                return Err(arg_err(
                    py,
                    format!("{name}: expected a positive int, got {v}"),
                ));
            }
        }
        // The core's rule, before a default plan of that size is built.
        rk(
            py,
            check_store_shape(
                num_layers as usize,
                batch_size as usize,
                num_kv_heads as usize,
                head_dim as usize,
            ),
        )?;
        let cfg = cfg_from(py, config.as_ref())?;
        let plan = match plan {
            None => rk(
                py,
                RotationPlan::identity(
                    num_layers as usize,
                    num_kv_heads as usize,
                    head_dim as usize,
                ),
            )?,
            Some(p) => {
                p.extract::<PyPlan>()
                    .map_err(|_| {
                        dtype_err(
                            py,
                            format!(
                                "plan: expected a rotatekv.RotationPlan, got {}",
                                p.get_type()
                            ),
                        )
                    })?
                    .inner
            }
        };
        let rope = match rope_inv_freq {
            None => None,
            Some(f) => Some(rk(
                py,
                Rope::new(
                    float_list(py, &f, "rope_inv_freq")?,
                    rope_scaling as f32,
                    head_dim as usize,
                ),
            )?),
        };
        let store = rk(
            py,
            KVStore::new(
                num_layers as usize,
                batch_size as usize,
                num_kv_heads as usize,
                head_dim as usize,
                cfg,
                plan,
                rope,
            ),
        )?;
        let mut store = store;
        rk(py, store.set_max_tokens(max_tokens_arg(py, max_tokens)?))?;
        if let Some(b) = backend {
            use_torch_stream(py, &b)?;
            store = rk(py, py.detach(|| guard(|| store.to_device(&b))))?;
        }
        Ok(PyStore {
            inner: RwLock::new(store),
        })
    }

    /// Most tokens one sequence may hold in one layer (`None`: unbounded). Appends past it
    /// raise `CapacityError` and leave the store unchanged.
    #[getter]
    fn get_max_tokens(&self) -> Option<usize> {
        self.read().meta.max_tokens
    }

    #[setter]
    fn set_max_tokens(&self, py: Python<'_>, value: Bound<'_, PyAny>) -> PyResult<()> {
        let v = max_tokens_arg(py, max_tokens_obj(&value)?)?;
        rk(py, self.write().set_max_tokens(v))
    }

    /// Appends tokens `k, v: [B, Hkv, T, D]` to `layer`.
    #[pyo3(signature = (layer, k, v, positions=None, protect=None, valid=None, bits=None))]
    #[allow(clippy::too_many_arguments)]
    fn append(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = layer_arg)] layer: i64,
        k: Bound<'_, PyAny>,
        v: Bound<'_, PyAny>,
        positions: Option<Bound<'_, PyAny>>,
        protect: Option<Bound<'_, PyAny>>,
        valid: Option<Bound<'_, PyAny>>,
        bits: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let (batch, heads, d) = {
            let s = self.read();
            (s.meta.batch, s.meta.heads, s.meta.d)
        };
        let layer = rk(py, self.read().check_layer(layer))?;
        let dev = self.read().dev.as_ref().map(|x| x.backend.clone());
        if let Some(backend) = dev {
            return self.append_device(
                py,
                layer,
                backend,
                (&k, &v),
                [&positions, &protect, &valid, &bits],
            );
        }
        let kb = borrow(&k, "k")?;
        let vb = borrow(&v, "v")?;
        let want = format!("[B={batch}, Hkv={heads}, T, D={d}]");
        let kv = kb.view4(py, "k", &want)?;
        let vv = vb.view4(py, "v", &want)?;
        let t = kv.shape[2];
        let (pos, prot, val, bts) =
            token_arrays(py, [&positions, &protect, &valid, &bits], batch, t)?;
        let args = AppendArgs {
            k: kv,
            v: vv,
            positions: pos.as_deref(),
            protect: prot.as_deref(),
            valid: val.as_deref(),
            bits: bts.as_deref(),
        };
        let res = py.detach(|| self.write().append(layer, &args));
        rk(py, res)
    }

    /// Attention of `q: [B, Hq, Tq, D]` over `layer`; returns `[B, Hq, Tq, D]` of q's type,
    /// and with `return_lse` also each row's log-sum-exp `float32 [B, Hq, Tq]`.
    #[pyo3(signature = (layer, q, positions=None, causal=true, scale=None, window=None, softcap=None, lag=0, return_lse=false))]
    #[allow(clippy::too_many_arguments)]
    fn attend<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = layer_arg)] layer: i64,
        q: Bound<'py, PyAny>,
        positions: Option<Bound<'py, PyAny>>,
        causal: bool,
        scale: Option<f64>,
        #[pyo3(from_py_with = window_arg)] window: Option<i64>,
        softcap: Option<f64>,
        #[pyo3(from_py_with = lag_arg)] lag: i64,
        return_lse: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (batch, heads, d) = {
            let s = self.read();
            (s.meta.batch, s.meta.heads, s.meta.d)
        };
        if lag < 0 {
            return Err(arg_err(py, format!("lag: expected an int >= 0, got {lag}")));
        }
        let lag = lag as usize;
        let layer = rk(py, self.read().check_layer(layer))?;
        let dev = self.read().dev.as_ref().map(|x| x.backend.clone());
        if let Some(backend) = dev {
            if let Some(w) = window {
                if w <= 0 {
                    return Err(arg_err(
                        py,
                        format!("window: expected a positive int, got {w}"),
                    ));
                }
            }
            let name = backend.name();
            let qd = dev_tensor(&q, "q", &name)?;
            if qd.shape[0] != batch || qd.shape[3] != d || qd.shape[1] % heads != 0 {
                return Err(shape_err(
                    py,
                    format!(
                        "q: expected shape [B={batch}, Hq (a multiple of {heads}), Tq, D={d}], got {:?}",
                        qd.shape
                    ),
                ));
            }
            super::call_hook(py, "check_finite", (&q, "q"))?;
            let pos = match &positions {
                None => None,
                Some(p) => {
                    let p = host(p)?;
                    let (v, shape) = int_array(py, &p, "positions")?;
                    check_2d(py, "positions", &shape, batch, qd.shape[2], true)?;
                    Some(v)
                }
            };
            let out_obj = q.call_method1("new_empty", (PyTuple::new(py, qd.shape)?,))?;
            let od = dev_tensor(&out_obj, "out", &name)?;
            let [b, hq, tq, _] = qd.shape;
            let lse_obj = if return_lse {
                let kw = PyDict::new(py);
                kw.set_item("dtype", py.import("torch")?.getattr("float32")?)?;
                Some(q.call_method("new_empty", (PyTuple::new(py, [b, hq, tq, 1])?,), Some(&kw))?)
            } else {
                None
            };
            let ld = match &lse_obj {
                Some(l) => Some(dev_tensor(l, "lse", &name)?),
                None => None,
            };
            let o = crate::attend::Options {
                positions: pos.as_deref(),
                causal,
                scale: scale.map(|s| s as f32),
                window: window.map(|w| w as usize),
                softcap: softcap.map(|s| s as f32),
                lag,
            };
            use_torch_stream(py, &backend)?;
            let res =
                py.detach(|| guard(|| self.read().attend_device(layer, &qd, &od, ld.as_ref(), &o)));
            rk(py, res)?;
            return match lse_obj {
                Some(l) => {
                    let l = l.call_method1("squeeze", (3,))?;
                    Ok(PyTuple::new(py, [out_obj, l])?.into_any())
                }
                None => Ok(out_obj),
            };
        }
        let qb = borrow(&q, "q")?;
        let qv = qb.view4(
            py,
            "q",
            &format!("[B={batch}, Hq (a multiple of {heads}), Tq, D={d}]"),
        )?;
        let tq = qv.shape[2];
        let pos = match &positions {
            None => None,
            Some(p) => {
                let (v, shape) = int_array(py, p, "positions")?;
                check_2d(py, "positions", &shape, batch, tq, true)?;
                Some(v)
            }
        };
        if let Some(w) = window {
            if w <= 0 {
                return Err(arg_err(
                    py,
                    format!("window: expected a positive int, got {w}"),
                ));
            }
        }
        let out_obj = new_output(py, &qb, &q, qv.shape)?;
        let mut ob = borrow(&out_obj, "out")?;
        let args = AttendArgs {
            q: qv,
            positions: pos.as_deref(),
            causal,
            scale: scale.map(|s| s as f32),
            window: window.map(|w| w as usize),
            softcap: softcap.map(|s| s as f32),
            lag,
        };
        let mut out = ob.out();
        let mut lse = vec![
            0f32;
            if return_lse {
                qv.shape[0] * qv.shape[1] * tq
            } else {
                0
            }
        ];
        let res = py.detach(|| {
            let s = self.read();
            if return_lse {
                s.attend_lse(layer, &args, &mut out, &mut lse)
            } else {
                s.attend(layer, &args, &mut out)
            }
        });
        rk(py, res)?;
        if !return_lse {
            return Ok(out_obj);
        }
        let arr = lse
            .to_pyarray(py)
            .reshape([qv.shape[0], qv.shape[1], tq])?
            .into_any();
        let arr = if qb.is_torch {
            py.import("torch")?.call_method1("from_numpy", (arr,))?
        } else {
            arr
        };
        Ok(PyTuple::new(py, [out_obj, arr])?.into_any())
    }

    /// Tokens stored per sequence in `layer`.
    fn seq_lens(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = layer_arg)] layer: i64,
    ) -> PyResult<Vec<usize>> {
        let s = self.read();
        let l = rk(py, s.check_layer(layer))?;
        Ok(s.seq_lens(l))
    }

    /// Allocated bytes of all pages.
    #[getter]
    fn nbytes(&self) -> usize {
        self.read().nbytes()
    }

    /// Bytes the stored tokens occupy (page slack excluded).
    #[getter]
    fn payload_bytes(&self) -> f64 {
        self.read().payload_bytes()
    }

    /// Bits per stored K/V element, scales, zeros, positions and 16-bit tokens included;
    /// `settled`: recent-window tokens counted at the width they will be stored in.
    #[pyo3(signature = (settled=false))]
    fn bits_per_element(&self, settled: bool) -> f64 {
        let s = self.read();
        if settled {
            s.settled_bits_per_element()
        } else {
            s.bits_per_element()
        }
    }

    /// Bits per K/V element of one token stored at width `bits` (what `bits_per_element`
    /// counts for it).
    fn class_bits(&self, py: Python<'_>, bits: i64) -> PyResult<f64> {
        let b = u8::try_from(bits).map_err(|_| {
            arg_err(
                py,
                format!("bits: expected one of {}, got {bits}", classes_str()),
            )
        })?;
        rk(py, self.read().class_bits(b))
    }

    /// Beam-search reorder: sequence i becomes old sequence indices[i].
    fn reorder(&self, py: Python<'_>, indices: Bound<'_, PyAny>) -> PyResult<()> {
        self.on_torch_stream(py)?;
        let (v, shape) = int_array(py, &host(&indices)?, "indices")?;
        if shape.len() != 1 {
            return Err(shape_err(
                py,
                format!("indices: expected a 1-D array, got shape {shape:?}"),
            ));
        }
        rk(py, guard(|| self.write().reorder(&v)))
    }

    /// Drops every token at position >= length (an int, or one per sequence).
    fn truncate(&self, py: Python<'_>, length: Bound<'_, PyAny>) -> PyResult<()> {
        self.on_torch_stream(py)?;
        let lens = if let Ok(x) = length.extract::<i64>() {
            vec![x]
        } else {
            int_array(py, &host(&length)?, "length")?.0
        };
        rk(py, guard(|| self.write().truncate(&lens)))
    }

    /// Removes every token.
    fn clear(&self) {
        self.write().clear()
    }

    /// Positions `int32 [n]`, keys and values `float32 [n, Hkv, D]` of one sequence,
    /// dequantized (a debugging aid: it materializes what attention never does).
    fn dequantize<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = layer_arg)] layer: i64,
        #[pyo3(from_py_with = seq_arg)] seq: i64,
    ) -> PyResult<Bound<'py, PyTuple>> {
        self.on_torch_stream(py)?;
        let s = self.read();
        let l = rk(py, s.check_layer(layer))?;
        if seq < 0 || seq as usize >= s.meta.batch {
            return Err(arg_err(
                py,
                format!("seq: expected 0 <= seq < {}, got {seq}", s.meta.batch),
            ));
        }
        let host;
        let s = if s.dev.is_some() {
            host = rk(py, guard(|| s.to_host()))?;
            &host
        } else {
            &*s
        };
        let (pos, k, v) = s.dequantize(l, seq as usize);
        let n = pos.len();
        let (h, d) = (s.meta.heads, s.meta.d);
        let pos = pos.to_pyarray(py).into_any();
        let k = k.to_pyarray(py).reshape([n, h, d])?.into_any();
        let v = v.to_pyarray(py).reshape([n, h, d])?.into_any();
        PyTuple::new(py, [pos, k, v])
    }

    /// Zero-copy views of the pages of one sequence (window pages last).
    fn page_buffers<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = layer_arg)] layer: i64,
        #[pyo3(from_py_with = seq_arg)] seq: i64,
    ) -> PyResult<Bound<'py, PyList>> {
        self.on_torch_stream(py)?;
        let s = self.read();
        let l = rk(py, s.check_layer(layer))?;
        if seq < 0 || seq as usize >= s.meta.batch {
            return Err(arg_err(
                py,
                format!("seq: expected 0 <= seq < {}, got {seq}", s.meta.batch),
            ));
        }
        let sq = &s.layers[l][seq as usize];
        let list = PyList::empty(py);
        let n_main = sq.pages.len();
        for (i, p) in sq.all_pages().enumerate() {
            let lay = s.meta.layout(p.bits);
            let mut layout = HashMap::new();
            layout.insert("positions".to_string(), 0);
            layout.insert("tags".to_string(), lay.tag_off);
            layout.insert("heads".to_string(), lay.head_off);
            layout.insert("head_bytes".to_string(), lay.head_bytes);
            layout.insert("key_codes".to_string(), 0);
            layout.insert("key_row_bytes".to_string(), lay.k_row);
            layout.insert("key_scales".to_string(), lay.k_scale);
            layout.insert("key_zeros".to_string(), lay.k_zero);
            layout.insert("value_codes".to_string(), lay.v_codes);
            layout.insert("value_row_bytes".to_string(), lay.v_row);
            layout.insert("value_scales".to_string(), lay.v_scale);
            layout.insert("value_zeros".to_string(), lay.v_zero);
            let buf = PyPageBuffer {
                page: p.clone(),
                bits: p.bits,
                capacity: p.cap,
                start: p.start,
                length: p.len,
                window: i >= n_main,
                layout,
            };
            list.append(Py::new(py, buf)?)?;
        }
        Ok(list)
    }

    /// Writes the whole store (safetensors, checksummed, atomically).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        self.on_torch_stream(py)?;
        let res = py.detach(|| {
            guard(|| {
                let s = self.read();
                match s.dev {
                    Some(_) => crate::persist::save(&s.to_host()?, &path),
                    None => crate::persist::save(&s, &path),
                }
            })
        });
        rk(py, res)
    }

    /// Reads a store written by `save`, verifying every page, onto `device`.
    #[staticmethod]
    #[pyo3(signature = (path, device="cpu"))]
    fn load(py: Python<'_>, path: PathBuf, device: &str) -> PyResult<Self> {
        let backend = backend_for(py, device)?;
        if let Some(b) = &backend {
            use_torch_stream(py, b)?;
        }
        let res = py.detach(|| {
            guard(|| {
                let s = crate::persist::load(&path)?;
                match &backend {
                    Some(b) => s.to_device(b),
                    None => Ok(s),
                }
            })
        });
        Ok(PyStore {
            inner: RwLock::new(rk(py, res)?),
        })
    }

    /// A copy of this store on `device` ('cpu', 'cuda', 'cuda:N', 'emu').
    fn to(&self, py: Python<'_>, device: &str) -> PyResult<Self> {
        self.on_torch_stream(py)?;
        let backend = backend_for(py, device)?;
        if let Some(b) = &backend {
            use_torch_stream(py, b)?;
        }
        let res = py.detach(|| {
            guard(|| {
                let s = self.read();
                let host = s.to_host()?;
                match &backend {
                    Some(b) => host.to_device(b),
                    None => Ok(host),
                }
            })
        });
        Ok(PyStore {
            inner: RwLock::new(rk(py, res)?),
        })
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.read().meta.num_layers
    }
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.read().meta.heads
    }
    #[getter]
    fn head_dim(&self) -> usize {
        self.read().meta.d
    }
    #[getter]
    fn batch_size(&self) -> usize {
        self.read().meta.batch
    }
    /// Where the pages live: 'cpu', 'cuda:N' or 'emu'.
    #[getter]
    fn device(&self) -> String {
        self.read().device_name()
    }
    /// The rotation plan.
    #[getter]
    fn plan(&self) -> PyPlan {
        PyPlan {
            inner: self.read().meta.plan.clone(),
        }
    }
    /// The resolved settings.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.read();
        let c = &s.meta.cfg;
        let d = PyDict::new(py);
        d.set_item("bits", c.bits)?;
        d.set_item("key_bits", c.bits)?;
        d.set_item("value_bits", c.value_width(c.bits))?;
        d.set_item("group_size", s.meta.group)?;
        d.set_item("key_clip", c.key_clip)?;
        d.set_item("value_clip", c.value_clip)?;
        d.set_item("residual", c.residual)?;
        d.set_item("key_layout", c.key_layout.as_str())?;
        d.set_item("page_tokens", s.meta.cap)?;
        d.set_item("fp_format", c.fp_format.as_str())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let s = self.read();
        let m = &s.meta;
        format!(
            "KVStore(num_layers={}, num_kv_heads={}, head_dim={}, batch_size={}, bits={}, mode='{}', tokens={}, nbytes={})",
            m.num_layers,
            m.heads,
            m.d,
            m.batch,
            m.cfg.bits,
            m.plan.mode.as_str(),
            s.total_tokens(),
            s.nbytes()
        )
    }
}
