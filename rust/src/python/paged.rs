//! Bindings of [`crate::paged`]: the block format and the kernels over caller-owned pools.
//! Conversion and error mapping only; every rule lives in the core.

use numpy::{IntoPyArray, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::buffers::{borrow, borrow_pool};
use super::classes::{float_list, int_array, rk, PyPlan};
use super::errors::{arg_err, dtype_err, shape_err};
use std::sync::Arc;

use super::device::{
    backend_for, check_on_device, dev_tensor, guard, raw_tensor, use_torch_stream,
};
use crate::attend::{Options, Recent};
use crate::cuda::backend::Backend;
use crate::cuda::launch::{PoolTables, PoolWrite};
use crate::device::DevTensor;
use crate::format::{class_of, classes_str, FpFormat};
use crate::paged::{self, BlockFormat};
use crate::rope::Rope;
use crate::rotation::RotationPlan;
use crate::simd;

/// The format of a pool's blocks (see `rotatekv.paged`).
#[pyclass(
    name = "BlockFormat",
    module = "rotatekv.paged",
    frozen,
    eq,
    subclass,
    skip_from_py_object
)]
#[derive(Clone, PartialEq)]
pub struct PyBlockFormat {
    inner: BlockFormat,
    /// The width asked for (keys and values unless `key_bits`/`value_bits` override it).
    bits: u8,
}

#[pymethods]
impl PyBlockFormat {
    #[new]
    #[pyo3(signature = (num_kv_heads, head_dim, bits=2, block_size=64, group_size=None, key_bits=None, value_bits=None, fp_format="float16"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        num_kv_heads: i64,
        head_dim: i64,
        bits: i64,
        block_size: i64,
        group_size: Option<i64>,
        key_bits: Option<i64>,
        value_bits: Option<i64>,
        fp_format: &str,
    ) -> PyResult<Self> {
        for (name, v) in [
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("block_size", block_size),
        ] {
            if !(1..=1 << 20).contains(&v) {
                return Err(arg_err(
                    py,
                    format!("{name}: expected a positive int, got {v}"),
                ));
            }
        }
        // Widths as the caller named them (`bits` unless overridden), checked against the
        // format table before they narrow to u8.
        let widths = [
            ("bits", bits),
            (
                key_bits.map_or("bits", |_| "key_bits"),
                key_bits.unwrap_or(bits),
            ),
            (
                value_bits.map_or("bits", |_| "value_bits"),
                value_bits.unwrap_or(bits),
            ),
        ];
        for (name, v) in widths {
            if !(0..=255).contains(&v) || class_of(v as u8).is_none() {
                return Err(arg_err(
                    py,
                    format!("{name}: expected one of {}, got {v}", classes_str()),
                ));
            }
        }
        let group = match group_size {
            Some(g) if g <= 0 => {
                return Err(arg_err(
                    py,
                    format!("group_size: expected a positive int or None, got {g}"),
                ))
            }
            g => g.map(|g| g as usize),
        };
        let fp = match fp_format {
            "float16" => FpFormat::F16,
            "bfloat16" => FpFormat::BF16,
            other => {
                return Err(arg_err(
                    py,
                    format!("fp_format: expected 'float16' or 'bfloat16', got {other:?}"),
                ))
            }
        };
        let inner = rk(
            py,
            BlockFormat::new(
                num_kv_heads as usize,
                head_dim as usize,
                widths[1].1 as u8,
                widths[2].1 as u8,
                block_size as usize,
                group,
                fp,
            ),
        )?;
        Ok(PyBlockFormat {
            inner,
            bits: bits as u8,
        })
    }

    /// KV heads.
    #[getter]
    fn num_kv_heads(&self) -> usize {
        self.inner.heads
    }
    /// Channels per head.
    #[getter]
    fn head_dim(&self) -> usize {
        self.inner.d
    }
    /// Bits per code asked for (16: unquantized); `key_bits`/`value_bits` may override it.
    #[getter]
    fn bits(&self) -> u8 {
        self.bits
    }
    /// Bits per key code.
    #[getter]
    fn key_bits(&self) -> u8 {
        self.inner.bits
    }
    /// Bits per value code.
    #[getter]
    fn value_bits(&self) -> u8 {
        self.inner.value_bits
    }
    /// Tokens per block.
    #[getter]
    fn block_size(&self) -> usize {
        self.inner.block_size
    }
    /// Channels per quantization group.
    #[getter]
    fn group_size(&self) -> usize {
        self.inner.group
    }
    /// Format of 16-bit blocks.
    #[getter]
    fn fp_format(&self) -> &'static str {
        self.inner.fp_format.as_str()
    }
    /// Bytes of one block of `block_size` tokens, all KV heads.
    #[getter]
    fn block_bytes(&self) -> usize {
        self.inner.block_bytes()
    }
    /// Stored bits per key or value element: codes, scales and zeros, nothing else.
    fn bits_per_element(&self) -> f64 {
        self.inner.bits_per_element()
    }
    /// Byte offsets of one head block's parts (the names of `PageBuffer.layout`), relative
    /// to the head block; head `h` starts at `h * head_bytes`.
    fn layout(&self) -> std::collections::HashMap<&'static str, usize> {
        let l = &self.inner.layout;
        [
            ("head_bytes", l.head_bytes),
            ("key_codes", 0),
            ("key_row_bytes", l.k_row),
            ("key_scales", l.k_scale),
            ("key_zeros", l.k_zero),
            ("value_codes", l.v_codes),
            ("value_row_bytes", l.v_row),
            ("value_scales", l.v_scale),
            ("value_zeros", l.v_zero),
        ]
        .into_iter()
        .collect()
    }
    fn __repr__(&self) -> String {
        let f = &self.inner;
        format!(
            "BlockFormat(num_kv_heads={}, head_dim={}, key_bits={}, value_bits={}, \
             block_size={}, group_size={}, fp_format='{}', block_bytes={})",
            f.heads,
            f.d,
            f.bits,
            f.value_bits,
            f.block_size,
            f.group,
            f.fp_format.as_str(),
            f.block_bytes()
        )
    }
}

fn fmt_arg(py: Python<'_>, fmt: &Bound<'_, PyAny>) -> PyResult<BlockFormat> {
    fmt.cast::<PyBlockFormat>()
        .map(|f| f.get().inner.clone())
        .map_err(|_| {
            dtype_err(
                py,
                format!(
                    "fmt: expected a rotatekv.paged.BlockFormat, got {}",
                    fmt.get_type()
                ),
            )
        })
}

fn plan_arg(
    py: Python<'_>,
    fmt: &BlockFormat,
    plan: Option<&Bound<'_, PyAny>>,
) -> PyResult<RotationPlan> {
    match plan {
        None => rk(py, RotationPlan::identity(1, fmt.heads, fmt.d)),
        Some(p) => Ok(p
            .extract::<PyPlan>()
            .map_err(|_| {
                dtype_err(
                    py,
                    format!(
                        "plan: expected a rotatekv.RotationPlan or None, got {}",
                        p.get_type()
                    ),
                )
            })?
            .inner),
    }
}

fn rope_arg(
    py: Python<'_>,
    fmt: &BlockFormat,
    inv_freq: Option<&Bound<'_, PyAny>>,
    scaling: f64,
) -> PyResult<Option<Rope>> {
    match inv_freq {
        None => Ok(None),
        Some(f) => Ok(Some(rk(
            py,
            Rope::new(float_list(py, f, "rope_inv_freq")?, scaling as f32, fmt.d),
        )?)),
    }
}

/// The device a paged call runs on: `device` when given (`"emu"`: the host emulation of the
/// CUDA kernels over CPU tensors), else a CUDA pool's own; `None` for the CPU kernels.
fn device_of(
    py: Python<'_>,
    pool: &Bound<'_, PyAny>,
    device: Option<&str>,
) -> PyResult<Option<(String, Arc<dyn Backend>)>> {
    let name = match device {
        Some(d) => d.to_string(),
        None if pool.hasattr("is_cuda")? && pool.getattr("is_cuda")?.extract::<bool>()? => {
            let idx: Option<i64> = pool.getattr("device")?.getattr("index")?.extract()?;
            format!("cuda:{}", idx.unwrap_or(0))
        }
        None => return Ok(None),
    };
    Ok(backend_for(py, &name)?.map(|b| (name, b)))
}

/// A pool on `dev`: its address and number of blocks.
fn dev_pool(pool: &Bound<'_, PyAny>, dev: &str, block_bytes: usize) -> PyResult<(u64, usize)> {
    check_on_device(pool, "pool", dev)?;
    let shape: Vec<usize> = pool.getattr("shape")?.extract()?;
    if shape.len() != 2 || shape[1] != block_bytes {
        return Err(shape_err(
            pool.py(),
            format!("pool: expected [num_blocks, {block_bytes}] (fmt.block_bytes), got {shape:?}"),
        ));
    }
    let ptr = raw_tensor(pool, "pool", dev, "torch.uint8", shape[0] * block_bytes)?;
    Ok((ptr, shape[0]))
}

/// A `[T, H, D]` float tensor on `dev`, described as `[1, T, H, D]` (nothing is copied).
fn dev_rows(obj: &Bound<'_, PyAny>, arg: &str, dev: &str) -> PyResult<DevTensor> {
    check_on_device(obj, arg, dev)?;
    let shape: Vec<usize> = obj.getattr("shape")?.extract()?;
    if shape.len() != 3 {
        return Err(shape_err(
            obj.py(),
            format!("{arg}: expected 3 dimensions [T, H, D], got shape {shape:?}"),
        ));
    }
    dev_tensor(&obj.call_method1("unsqueeze", (0,))?, arg, dev)
}

/// A contiguous int32 or int64 tensor of `shape` on `dev`: address and whether it is int64.
fn dev_ints(
    obj: &Bound<'_, PyAny>,
    arg: &str,
    dev: &str,
    shape: &[usize],
) -> PyResult<(u64, bool)> {
    dev_ints_of(obj, arg, dev, shape, &["torch.int64", "torch.int32"])
}

fn dev_ints_of(
    obj: &Bound<'_, PyAny>,
    arg: &str,
    dev: &str,
    shape: &[usize],
    dtypes: &[&str],
) -> PyResult<(u64, bool)> {
    let py = obj.py();
    check_on_device(obj, arg, dev)?;
    let got: String = obj.getattr("dtype")?.str()?.extract()?;
    if !dtypes.contains(&got.as_str()) {
        return Err(dtype_err(
            py,
            format!(
                "{arg}: expected dtype {} on the device, got {got}",
                dtypes.join(" or ")
            ),
        ));
    }
    let s: Vec<usize> = obj.getattr("shape")?.extract()?;
    if s != shape {
        return Err(shape_err(
            py,
            format!("{arg}: expected shape {shape:?}, got {s:?}"),
        ));
    }
    let ptr = raw_tensor(obj, arg, dev, &got, shape.iter().product())?;
    Ok((ptr, got == "torch.int64"))
}

fn ints(py: Python<'_>, obj: &Bound<'_, PyAny>, name: &str, ndim: usize) -> PyResult<Vec<i64>> {
    let (v, shape) = int_array(py, obj, name)?;
    if shape.len() != ndim {
        return Err(shape_err(
            py,
            format!("{name}: expected {ndim} dimension(s), got shape {shape:?}"),
        ));
    }
    Ok(v)
}

/// Quantizes and packs ``k, v: [T, Hkv, D]`` into ``pool`` at ``slot_mapping: [T]``.
///
/// A slot is ``block * block_size + offset``; ``-1`` marks padding (skipped). ``positions:
/// [T]`` are the tokens' RoPE positions: ``pre_rope`` plans undo RoPE with them (keys arrive
/// after RoPE, as models compute them) and then need ``rope_inv_freq``/``rope_scaling``, as
/// ``rotatekv.KVStore`` does. ``plan``: a ``rotatekv.RotationPlan`` whose layer ``layer``
/// rotates these keys (``None``: no rotation). Only the addressed slots change; on an error
/// nothing does.
///
/// ``device``: ``None`` runs where the pool is (CPU kernels, or the CUDA kernels for a CUDA
/// tensor); ``"emu"`` runs the CUDA kernels' host build over CPU tensors. On a device every
/// argument is a tensor there (``slot_mapping``/``positions`` int32 or int64), the slot
/// mapping is read by the kernel (slots outside the pool are skipped, not refused) and the
/// write is queued on torch's current stream.
#[pyfunction(name = "_paged_write")]
#[pyo3(signature = (pool, fmt, k, v, slot_mapping, positions=None, *, plan=None, layer=0, rope_inv_freq=None, rope_scaling=1.0, device=None))]
#[allow(clippy::too_many_arguments)]
pub fn write(
    py: Python<'_>,
    pool: Bound<'_, PyAny>,
    fmt: Bound<'_, PyAny>,
    k: Bound<'_, PyAny>,
    v: Bound<'_, PyAny>,
    slot_mapping: Bound<'_, PyAny>,
    positions: Option<Bound<'_, PyAny>>,
    plan: Option<Bound<'_, PyAny>>,
    layer: i64,
    rope_inv_freq: Option<Bound<'_, PyAny>>,
    rope_scaling: f64,
    device: Option<&str>,
) -> PyResult<()> {
    let f = fmt_arg(py, &fmt)?;
    let plan = plan_arg(py, &f, plan.as_ref())?;
    if layer < 0 {
        return Err(arg_err(py, format!("layer: expected >= 0, got {layer}")));
    }
    let rope = rope_arg(py, &f, rope_inv_freq.as_ref(), rope_scaling)?;
    let m = rk(py, f.meta(&plan, layer as usize, rope))?;
    if let Some((dev, bk)) = device_of(py, &pool, device)? {
        let (pool_ptr, nb) = dev_pool(&pool, &dev, f.block_bytes())?;
        let kd = dev_rows(&k, "k", &dev)?;
        let vd = dev_rows(&v, "v", &dev)?;
        let t = kd.shape[1];
        let (slots, slots_i64) = dev_ints(&slot_mapping, "slot_mapping", &dev, &[t])?;
        let (pos, pos_i64) = match &positions {
            None => (0, false),
            Some(p) => dev_ints(p, "positions", &dev, &[t])?,
        };
        // The rule of every store: finite keys and values (a device check waits for it).
        super::call_hook(py, "check_finite", (&k, "k"))?;
        super::call_hook(py, "check_finite", (&v, "v"))?;
        let w = PoolWrite {
            k: &kd,
            v: &vd,
            slots,
            slots_i64,
            positions: pos,
            pos_i64,
        };
        use_torch_stream(py, &bk)?;
        let res = py.detach(|| guard(|| paged::write_device(&bk, &f, &m, pool_ptr, nb, &w)));
        return rk(py, res);
    }
    let mut pb = borrow_pool(&pool, "pool", true)?;
    let expected = format!("[T, Hkv={}, D={}]", f.heads, f.d);
    let kb = borrow(&k, "k")?;
    let vb = borrow(&v, "v")?;
    let kv = kb.view3(py, "k", &expected)?;
    let vv = vb.view3(py, "v", &expected)?;
    let slots = ints(py, &slot_mapping, "slot_mapping", 1)?;
    let pos = match &positions {
        None => None,
        Some(p) => Some(ints(py, p, "positions", 1)?),
    };
    if pb.shape[1] != f.block_bytes() {
        return Err(shape_err(
            py,
            format!(
                "pool: expected [num_blocks, {}] (fmt.block_bytes), got {:?}",
                f.block_bytes(),
                pb.shape
            ),
        ));
    }
    let args = paged::WriteArgs {
        k: kv,
        v: vv,
        slots: &slots,
        positions: pos.as_deref(),
    };
    let bytes = pb.bytes_mut();
    rk(py, py.detach(|| paged::write(bytes, &f, &m, &args)))
}

/// Attention of ragged queries ``q: [Tq_total, Hq, D]`` over each request's tokens.
///
/// ``query_start_loc: [B+1]``: request ``b``'s queries are rows ``q_start .. q_end`` of ``q``,
/// its last ``q_end - q_start`` positions; ``seq_lens: [B]`` its tokens; ``block_table:
/// [B, max_blocks]`` its blocks. ``scale`` defaults to ``1/sqrt(D)``; ``window``: a key is
/// visible when ``q_pos - k_pos < window``; ``softcap``: Gemma-style logit capping. Returns
/// ``out`` ``[Tq_total, Hq, D]`` (q's dtype; written into ``out`` when given), and with
/// ``return_lse`` also the float32 log-sum-exp ``[Tq_total, Hq]`` (``-inf`` for a row that
/// sees no key, whose output is 0). A request with no tokens gives zeros.
///
/// ``device`` as for ``write``. On a device ``block_table``, ``seq_lens`` and
/// ``query_start_loc`` are int32 tensors there, read by the kernel (no host copy); block ids
/// outside the pool read as no tokens. ``max_query_len``: the most queries of one request
/// (serving engines know it); without it, one read of ``query_start_loc`` waits for the
/// device.
///
/// Recent rows (CPU pools): a serving engine's 16-bit window of each request's newest
/// tokens, kept beside the pool, read in the same softmax as the pages. ``recent_k``/
/// ``recent_v: [N, Hkv, D]`` (side rows) and optionally ``step_k``/``step_v: [T, Hkv, D]``
/// (the step's own rows) are the sources, any float dtype; ``recent_idx: [Tq_total, R]``:
/// column ``j`` of a query at position ``p`` is the key at ``p - R + 1 + j``, held in row
/// ``recent_idx[i, j]`` (rows ``0..N`` of ``recent_k``, then ``N..N + T`` of ``step_k``;
/// ``-1``: not held); ``recent_lag: [B]``: request ``b`` reads its newest ``recent_lag[b]``
/// positions (``<= R``) from the rows and only older ones from the pool. Needs ``causal``.
#[pyfunction(name = "_paged_attend")]
#[pyo3(signature = (pool, fmt, q, block_table, seq_lens, query_start_loc, *, plan=None, layer=0, scale=None, causal=true, window=None, softcap=None, out=None, return_lse=false, rope_inv_freq=None, rope_scaling=1.0, max_query_len=None, device=None, recent_k=None, recent_v=None, recent_idx=None, recent_lag=None, step_k=None, step_v=None))]
#[allow(clippy::too_many_arguments)]
pub fn attend<'py>(
    py: Python<'py>,
    pool: Bound<'py, PyAny>,
    fmt: Bound<'py, PyAny>,
    q: Bound<'py, PyAny>,
    block_table: Bound<'py, PyAny>,
    seq_lens: Bound<'py, PyAny>,
    query_start_loc: Bound<'py, PyAny>,
    plan: Option<Bound<'py, PyAny>>,
    layer: i64,
    scale: Option<f64>,
    causal: bool,
    window: Option<i64>,
    softcap: Option<f64>,
    out: Option<Bound<'py, PyAny>>,
    return_lse: bool,
    rope_inv_freq: Option<Bound<'py, PyAny>>,
    rope_scaling: f64,
    max_query_len: Option<i64>,
    device: Option<&str>,
    recent_k: Option<Bound<'py, PyAny>>,
    recent_v: Option<Bound<'py, PyAny>>,
    recent_idx: Option<Bound<'py, PyAny>>,
    recent_lag: Option<Bound<'py, PyAny>>,
    step_k: Option<Bound<'py, PyAny>>,
    step_v: Option<Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let f = fmt_arg(py, &fmt)?;
    let given = [&recent_k, &recent_v, &recent_idx, &recent_lag].map(|x| x.is_some());
    let with_recent = given.iter().any(|&g| g);
    if with_recent && !given.iter().all(|&g| g) {
        return Err(arg_err(
            py,
            "recent_k: recent_k, recent_v, recent_idx and recent_lag go together".to_string(),
        ));
    }
    if step_k.is_some() != step_v.is_some() || (step_k.is_some() && !with_recent) {
        return Err(arg_err(
            py,
            "step_k: step_k and step_v go together, with recent_k".to_string(),
        ));
    }
    let plan = plan_arg(py, &f, plan.as_ref())?;
    if layer < 0 {
        return Err(arg_err(py, format!("layer: expected >= 0, got {layer}")));
    }
    if let Some(w) = window {
        if w <= 0 {
            return Err(arg_err(
                py,
                format!("window: expected a positive int, got {w}"),
            ));
        }
    }
    if let Some(n) = max_query_len {
        if n < 0 {
            return Err(arg_err(
                py,
                format!("max_query_len: expected an int >= 0 or None, got {n}"),
            ));
        }
    }
    let rope = rope_arg(py, &f, rope_inv_freq.as_ref(), rope_scaling)?;
    let m = rk(py, f.meta(&plan, layer as usize, rope))?;
    let opts = Options {
        positions: None,
        causal,
        scale: scale.map(|s| s as f32),
        window: window.map(|w| w as usize),
        softcap: softcap.map(|s| s as f32),
        lag: 0,
    };
    if let Some((dev, bk)) = device_of(py, &pool, device)? {
        if with_recent {
            return Err(arg_err(
                py,
                "recent_k: recent rows are read by the CPU kernels only (pools in host memory)"
                    .to_string(),
            ));
        }
        let (pool_ptr, nb) = dev_pool(&pool, &dev, f.block_bytes())?;
        let qd = dev_rows(&q, "q", &dev)?;
        let [_, tq, hq, d] = qd.shape;
        let bt_shape: Vec<usize> = match check_on_device(&block_table, "block_table", &dev) {
            Ok(()) => block_table.getattr("shape")?.extract()?,
            Err(e) => return Err(e),
        };
        if bt_shape.len() != 2 {
            return Err(shape_err(
                py,
                format!("block_table: expected [B, max_blocks], got shape {bt_shape:?}"),
            ));
        }
        let b = bt_shape[0];
        let i32s = ["torch.int32"];
        let (bt, _) = dev_ints_of(&block_table, "block_table", &dev, &bt_shape, &i32s)?;
        let (lens, _) = dev_ints_of(&seq_lens, "seq_lens", &dev, &[b], &i32s)?;
        let (qsl, _) = dev_ints_of(&query_start_loc, "query_start_loc", &dev, &[b + 1], &i32s)?;
        super::call_hook(py, "check_finite", (&q, "q"))?;
        // The longest request's query count bounds the grid; serving engines know it on the
        // host, and without it one read of query_start_loc waits for the device.
        let mql = match max_query_len {
            Some(n) => n as usize,
            None if b == 0 => 0,
            None => query_start_loc
                .call_method0("diff")?
                .call_method0("max")?
                .call_method0("item")?
                .extract::<i64>()?
                .max(0) as usize,
        };
        let out_obj = match out {
            Some(o) => o,
            None => q.call_method1("new_zeros", (PyTuple::new(py, [tq, hq, d])?,))?,
        };
        let od = dev_rows(&out_obj, "out", &dev)?;
        if od.dtype != qd.dtype || od.shape != qd.shape {
            return Err(shape_err(
                py,
                format!(
                    "out: expected a [{tq}, {hq}, {d}] tensor of q's dtype, got {:?}",
                    &od.shape[1..]
                ),
            ));
        }
        let lse_obj = if return_lse {
            let kw = pyo3::types::PyDict::new(py);
            kw.set_item("dtype", py.import("torch")?.getattr("float32")?)?;
            Some(q.call_method("new_zeros", (PyTuple::new(py, [tq, hq])?,), Some(&kw))?)
        } else {
            None
        };
        let ld = match &lse_obj {
            Some(l) => Some(dev_rows(&l.call_method1("unsqueeze", (-1,))?, "lse", &dev)?),
            None => None,
        };
        let tables = PoolTables {
            block_table: bt,
            max_blocks: bt_shape[1],
            seq_lens: lens,
            query_start: qsl,
            batch: b,
            max_query_len: mql,
        };
        use_torch_stream(py, &bk)?;
        let res = py.detach(|| {
            guard(|| {
                paged::attend_device(
                    &bk,
                    &f,
                    &m,
                    pool_ptr,
                    nb,
                    &tables,
                    &qd,
                    &od,
                    ld.as_ref(),
                    &opts,
                )
            })
        });
        rk(py, res)?;
        return match lse_obj {
            None => Ok(out_obj),
            Some(l) => Ok(PyTuple::new(py, [out_obj, l])?.into_any()),
        };
    }
    let pb = borrow_pool(&pool, "pool", false)?;
    if pb.shape[1] != f.block_bytes() {
        return Err(shape_err(
            py,
            format!(
                "pool: expected [num_blocks, {}] (fmt.block_bytes), got {:?}",
                f.block_bytes(),
                pb.shape
            ),
        ));
    }
    let qb = borrow(&q, "q")?;
    let qv = qb.view3(
        py,
        "q",
        &format!("[Tq, Hq (a multiple of {}), D={}]", f.heads, f.d),
    )?;
    let (bt, bt_shape) = int_array(py, &block_table, "block_table")?;
    if bt_shape.len() != 2 {
        return Err(shape_err(
            py,
            format!("block_table: expected [B, max_blocks], got shape {bt_shape:?}"),
        ));
    }
    let lens = ints(py, &seq_lens, "seq_lens", 1)?;
    let qsl = ints(py, &query_start_loc, "query_start_loc", 1)?;
    if bt_shape[0] != lens.len() {
        return Err(shape_err(
            py,
            format!(
                "block_table: expected [B={}, max_blocks] (B from seq_lens), got {bt_shape:?}",
                lens.len()
            ),
        ));
    }
    let [_, tq, hq, d] = qv.shape;
    let out_obj = match out {
        Some(o) => {
            let same_dtype = o.getattr("dtype")?.eq(q.getattr("dtype")?)?;
            let shape: Vec<usize> = o.getattr("shape")?.extract()?;
            let contiguous: bool = if qb.is_torch {
                o.call_method0("is_contiguous")?.extract()?
            } else {
                o.getattr("flags")?.getattr("c_contiguous")?.extract()?
            };
            if !same_dtype || shape != [tq, hq, d] || !contiguous {
                return Err(shape_err(
                    py,
                    format!(
                        "out: expected a contiguous [{tq}, {hq}, {d}] tensor of q's dtype, got {shape:?}"
                    ),
                ));
            }
            o
        }
        None if qb.is_torch => q.call_method1("new_empty", (PyTuple::new(py, [tq, hq, d])?,))?,
        None => py.import("numpy")?.call_method1(
            "empty",
            (PyTuple::new(py, [tq, hq, d])?, q.getattr("dtype")?),
        )?,
    };
    let mut ob = borrow(&out_obj, "out")?;
    let rows_shape = format!("[rows, {}, {}]", f.heads, f.d);
    let srcs = match (&recent_k, &recent_v) {
        (Some(k), Some(v)) => Some([
            borrow(k, "recent_k")?,
            borrow(v, "recent_v")?,
            match &step_k {
                Some(x) => borrow(x, "step_k")?,
                None => borrow(k, "recent_k")?,
            },
            match &step_v {
                Some(x) => borrow(x, "step_v")?,
                None => borrow(v, "recent_v")?,
            },
        ]),
        _ => None,
    };
    let idx = match &recent_idx {
        Some(x) => Some(int_array(py, x, "recent_idx")?),
        None => None,
    };
    let lag = match &recent_lag {
        Some(x) => Some(ints(py, x, "recent_lag", 1)?),
        None => None,
    };
    let recent = match (&srcs, &idx, &lag) {
        (Some(s), Some((idx, ishape)), Some(lag)) => {
            if ishape.len() != 2 {
                return Err(shape_err(
                    py,
                    format!("recent_idx: expected [Tq, R], got shape {ishape:?}"),
                ));
            }
            let names = ["recent_k", "recent_v", "step_k", "step_v"];
            let mut views = Vec::with_capacity(4);
            for (b, n) in s.iter().zip(names) {
                views.push(b.view3(py, n, &rows_shape)?);
            }
            if step_k.is_none() {
                // No step rows: an empty second source.
                for v in &mut views[2..] {
                    v.shape[1] = 0;
                }
            }
            Some(Recent {
                k: [views[0], views[2]],
                v: [views[1], views[3]],
                idx,
                r: ishape[1],
                lag,
            })
        }
        _ => None,
    };
    let args = paged::AttendArgs {
        q: qv,
        block_table: &bt,
        max_blocks: bt_shape[1],
        seq_lens: &lens,
        query_start_loc: &qsl,
        opts,
        recent,
    };
    let mut lse = vec![0f32; if return_lse { tq * hq } else { 0 }];
    let mut o = ob.out();
    let bytes = pb.bytes();
    let res = py.detach(|| {
        let l = if return_lse { Some(&mut lse[..]) } else { None };
        paged::attend(simd::level(), bytes, &f, &m, &args, &mut o, l)
    });
    rk(py, res)?;
    if !return_lse {
        return Ok(out_obj);
    }
    let arr = lse.into_pyarray(py).reshape([tq, hq])?.into_any();
    let lse_obj = if qb.is_torch {
        py.import("torch")?.call_method1("from_numpy", (arr,))?
    } else {
        arr
    };
    Ok(PyTuple::new(py, [out_obj, lse_obj])?.into_any())
}

/// Registers the submodule's classes and functions on the extension module (`rotatekv.paged`
/// re-exports them).
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBlockFormat>()?;
    m.add_function(wrap_pyfunction!(write, m)?)?;
    m.add_function(wrap_pyfunction!(attend, m)?)?;
    Ok(())
}
