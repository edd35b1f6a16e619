//! The packed KV store: layers x sequences x KV heads, paged, with precision classes.
//!
//! Each (layer, sequence) owns a list of [`Page`]s. A token lives in exactly one page:
//! * quantized pages of its precision class (2, 3, 4 or 8 bits; the config's `bits` unless
//!   the caller gives per-token bits);
//! * 16-bit pages for protected tokens (attention sinks) and for 16-bit classes;
//! * the recent window: 16-bit pages holding the newest `residual` tokens (more, up to a
//!   block, with per-channel keys), drained from the front into quantized pages as tokens
//!   age. A token that enters the window is quantized from its 16-bit copy, and one that
//!   would leave it at once is rounded to 16 bits the same way, so results do not depend on
//!   how the sequence was chunked.
//!
//! Pages are reference-counted: `reorder` (beam search) shares them between sequences and a
//! shared page is copied only when a sequence appends into it (copy on write).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;

use rayon::prelude::*;

use crate::attend::{self, AttendArgs, Job, Masking, Options, Queries};
use crate::config::{KeyLayout, Meta, QuantConfig};
use crate::cuda::abi::{self, dtype_code, RkvDst, RkvSrc};
use crate::cuda::backend::Backend;
use crate::cuda::launch::{AttendIo, KvSource, PageList};
use crate::device::{DevBuf, DevTensor};
use crate::error::{Error, Result};
use crate::format::{check_bits, class_index, FpFormat, Layout, NUM_CLASSES};
use crate::page::{
    move_slot, write_fp, write_quant_per_channel, write_quant_per_token, Chunk, Page, PageView,
};
use crate::quant::unpack_row;
use crate::rope::Rope;
use crate::rotation::RotationPlan;
use crate::simd::{self, f16_to_f32, Level};
use crate::tensor::{DType, OutData, View4};

/// One sequence of one layer.
#[derive(Clone, Debug, Default)]
pub struct Seq {
    /// Quantized and 16-bit pages (not the window).
    pub pages: Vec<Arc<Page>>,
    /// The recent window, oldest first.
    pub window: VecDeque<Arc<Page>>,
    /// The page of each class accepting tokens.
    open: [Option<usize>; NUM_CLASSES],
    /// Position given to the next token when the caller gives none.
    pub next_pos: i64,
}

impl Seq {
    /// Stored tokens.
    pub fn len(&self) -> usize {
        self.pages
            .iter()
            .chain(self.window.iter())
            .map(|p| p.live())
            .sum()
    }
    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Every page, window last.
    pub fn all_pages(&self) -> impl Iterator<Item = &Arc<Page>> {
        self.pages.iter().chain(self.window.iter())
    }
}

/// The store.
#[derive(Clone, Debug)]
pub struct KVStore {
    /// Shapes, settings, plan.
    pub meta: Meta,
    /// `[layer][sequence]`.
    pub layers: Vec<Vec<Seq>>,
    /// Set when the pages live on a device (see [`KVStore::to_device`]).
    pub dev: Option<DeviceState>,
}

/// What a device store keeps on its device besides pages: the plan's permutations (one
/// `u32` array per layer) and RoPE's inverse frequencies.
#[derive(Clone, Debug)]
pub struct DeviceState {
    /// Memory and launches.
    pub backend: Arc<dyn Backend>,
    /// `key_perm[layer]` on the device.
    pub perm: Vec<DevBuf>,
    /// `inv_freq` on the device (pre-RoPE plans).
    pub inv_freq: Option<DevBuf>,
}

/// What [`KVStore::append_device`] takes besides the layer. Values are checked for range by
/// the caller (the Python layer, on the device).
#[derive(Clone, Copy, Debug)]
pub struct DevAppendArgs<'a> {
    /// Keys `[B, Hkv, T, D]`.
    pub k: DevTensor,
    /// Values `[B, Hkv, T, D]`.
    pub v: DevTensor,
    /// As in [`AppendArgs`].
    pub tokens: TokenArgs<'a>,
}

/// Per-token arguments of an append (host arrays).
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenArgs<'a> {
    /// Positions, `[B*T]` or `[T]`.
    pub positions: Option<&'a [i64]>,
    /// Protected tokens `[B*T]`.
    pub protect: Option<&'a [bool]>,
    /// Tokens to store `[B*T]`.
    pub valid: Option<&'a [bool]>,
    /// Per-token bits `[B*T]`.
    pub bits: Option<&'a [u8]>,
}

impl AppendArgs<'_> {
    fn tokens(&self) -> TokenArgs<'_> {
        TokenArgs {
            positions: self.positions,
            protect: self.protect,
            valid: self.valid,
            bits: self.bits,
        }
    }
}

/// Device work collected while a layer's sequences are appended, launched at the end.
#[derive(Default)]
struct DevOps {
    backend: Option<Arc<dyn Backend>>,
    srcs: Vec<RkvSrc>,
    dsts: Vec<RkvDst>,
    /// Per-channel pages: (address, class, first key row).
    channel: Vec<(u64, usize, i32)>,
    key_rows: i32,
    /// Window pages emptied by this append: their memory is read by the launch, so they go
    /// back to the pool only after it is queued.
    keep: Vec<Arc<Page>>,
}

/// What [`KVStore::append`] takes besides the layer.
#[derive(Clone, Copy, Debug)]
pub struct AppendArgs<'a> {
    /// Keys `[B, Hkv, T, D]`.
    pub k: View4<'a>,
    /// Values `[B, Hkv, T, D]`.
    pub v: View4<'a>,
    /// Positions, `[B*T]` or `[T]`.
    pub positions: Option<&'a [i64]>,
    /// Protected tokens `[B*T]`.
    pub protect: Option<&'a [bool]>,
    /// Tokens to store `[B*T]`.
    pub valid: Option<&'a [bool]>,
    /// Per-token bits `[B*T]`.
    pub bits: Option<&'a [u8]>,
}

/// Raw tokens of one sequence in f32: keys and values `[n][Hkv*D]`.
#[derive(Default)]
struct Staged {
    k: Vec<f32>,
    v: Vec<f32>,
    /// Device stores stage where each token's rows are instead of their values.
    src: Vec<RkvSrc>,
    pos: Vec<i32>,
    tag: Vec<u8>,
}

impl Staged {
    fn push_from(&mut self, other: &Staged, i: usize, hd: usize) {
        if other.src.is_empty() {
            self.k.extend_from_slice(&other.k[i * hd..(i + 1) * hd]);
            self.v.extend_from_slice(&other.v[i * hd..(i + 1) * hd]);
        } else {
            self.src.push(other.src[i]);
        }
        self.pos.push(other.pos[i]);
        self.tag.push(other.tag[i]);
    }
    fn len(&self) -> usize {
        self.pos.len()
    }
}

/// Checks positions given per token (`[B*T]`) or shared by the batch (`[T]`): each one in
/// `0 .. 2^31 - 1`. `t_name` names the token axis in errors (`T`, `Tq`).
pub fn check_positions(p: &[i64], b: usize, t: usize, t_name: &str) -> Result<()> {
    if p.len() != b * t && p.len() != t {
        return Err(Error::shape(
            "positions",
            format!("[B={b}, {t_name}={t}] or [{t_name}={t}]"),
            format!("{} elements", p.len()),
        ));
    }
    if let Some(x) = p.iter().find(|x| !(0..i32::MAX as i64).contains(*x)) {
        return Err(Error::value(
            "positions",
            "0 <= position < 2^31 - 1",
            x.to_string(),
        ));
    }
    Ok(())
}

fn shape_str(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

impl KVStore {
    /// A new, empty store.
    pub fn new(
        num_layers: usize,
        batch: usize,
        heads: usize,
        d: usize,
        cfg: QuantConfig,
        plan: RotationPlan,
        rope: Option<Rope>,
    ) -> Result<Self> {
        let meta = Meta::new(num_layers, batch, heads, d, cfg, plan, rope)?;
        Ok(KVStore {
            meta,
            layers: vec![vec![Seq::default(); batch]; num_layers],
            dev: None,
        })
    }

    /// Live pages of a layer's sequences as the kernels read them.
    pub fn views(&self, layer: usize) -> Vec<Vec<PageView<'_>>> {
        self.layers[layer]
            .iter()
            .map(|s| {
                s.all_pages()
                    .filter(|p| p.live() > 0)
                    .map(|p| p.view(self.meta.layout(p.bits)))
                    .collect()
            })
            .collect()
    }

    /// Checks a query shape `[B, Hq, Tq, D]` and the options; gives the masking and the
    /// query positions `[B*Tq]` (the last `Tq` of each sequence unless given).
    fn check_queries(
        &self,
        layer: usize,
        shape: [usize; 4],
        o: &Options,
    ) -> Result<(Masking, Vec<i32>)> {
        let m = &self.meta;
        let [b, hq, tq, d] = shape;
        if b != m.batch || d != m.d || hq == 0 || hq % m.heads != 0 {
            return Err(Error::shape(
                "q",
                format!(
                    "[B={}, Hq (a multiple of {}), Tq, D={}]",
                    m.batch, m.heads, m.d
                ),
                format!("[{b}, {hq}, {tq}, {d}]"),
            ));
        }
        if let Some(p) = o.positions {
            check_positions(p, b, tq, "Tq")?;
        }
        let mk = attend::check_options(o, d)?;
        let seqs = &self.layers[layer];
        let mut qpos = vec![0i32; b * tq];
        for bi in 0..b {
            for t in 0..tq {
                qpos[bi * tq + t] = match o.positions {
                    Some(p) if p.len() == tq => p[t] as i32,
                    Some(p) => p[bi * tq + t] as i32,
                    None => (seqs[bi].next_pos - tq as i64 + t as i64).max(0) as i32,
                };
            }
        }
        Ok((mk, qpos))
    }

    /// Attention of every query of `layer` over the stored tokens; writes `[B, Hq, Tq, D]`
    /// into `out`.
    pub fn attend(&self, layer: usize, a: &AttendArgs, out: &mut OutData) -> Result<()> {
        self.attend_at(simd::level(), layer, a, out, None)
    }

    /// [`KVStore::attend`] that also writes each row's log-sum-exp of its scaled (and
    /// capped) scores, `lse: [B, Hq, Tq]` (`-inf` for a row that sees no key, whose output
    /// is 0), so that attention over disjoint key sets can be merged exactly.
    pub fn attend_lse(
        &self,
        layer: usize,
        a: &AttendArgs,
        out: &mut OutData,
        lse: &mut [f32],
    ) -> Result<()> {
        self.attend_at(simd::level(), layer, a, out, Some(lse))
    }

    /// [`KVStore::attend`] at a given SIMD level (tests compare levels).
    pub fn attend_at(
        &self,
        level: Level,
        layer: usize,
        a: &AttendArgs,
        out: &mut OutData,
        lse: Option<&mut [f32]>,
    ) -> Result<()> {
        if self.dev.is_some() {
            return Err(Error::device(format!(
                "q: this store lives on {}: pass device tensors",
                self.device_name()
            )));
        }
        let [b, hq, tq, _] = a.q.shape;
        let (masking, qpos) = self.check_queries(layer, a.q.shape, &a.options())?;
        let rows = Queries::uniform(b, hq, tq);
        let n = b * hq * tq;
        if out.len() != n * self.meta.d {
            return Err(Error::shape(
                "out",
                format!("{} elements", n * self.meta.d),
                out.len().to_string(),
            ));
        }
        let q = attend::dense_queries(&rows, self.meta.d, masking.scale, |b, h, t, row| {
            a.q.read_row(b, h, t, row)
        })?;
        let job = Job {
            meta: &self.meta,
            layer,
            pages: self.views(layer),
            rows,
            qpos,
            causal: a.causal,
            softcap: a.softcap,
            masking,
            recent: None,
        };
        attend::run(level, &job, q, out, lse)
    }

    /// Attention of a device store: `q` and `out` (`[B, Hq, Tq, D]`, same dtype) are device
    /// tensors; the fused kernel reads the packed pages in place (split-K over pages, then
    /// one combine launch), on the backend's current stream. `lse`, when given, is a
    /// contiguous float32 device tensor `[B, Hq, Tq]` that receives each row's log-sum-exp
    /// (as in [`KVStore::attend_lse`]).
    pub fn attend_device(
        &self,
        layer: usize,
        q: &DevTensor,
        out: &DevTensor,
        lse: Option<&DevTensor>,
        o: &Options,
    ) -> Result<()> {
        let Some(dev) = &self.dev else {
            return Err(Error::device(
                "q: this store lives on the CPU: pass CPU tensors",
            ));
        };
        if out.shape != q.shape || out.dtype != q.dtype {
            return Err(Error::shape(
                "out",
                format!("{:?} of {}", q.shape, q.dtype.name()),
                format!("{:?} of {}", out.shape, out.dtype.name()),
            ));
        }
        if let Some(l) = lse {
            let [b, hq, tq, _] = q.shape;
            let want = [tq * hq, tq, 1];
            if l.dtype != DType::F32
                || l.shape[..3] != [b, hq, tq]
                || l.shape[3] != 1
                || (b * hq * tq > 1 && l.strides[..3] != want)
            {
                return Err(Error::shape(
                    "lse",
                    format!("a contiguous float32 [{b}, {hq}, {tq}]"),
                    format!("{:?} of {}", &l.shape[..3], l.dtype.name()),
                ));
            }
        }
        let (mk, mut qpos) = self.check_queries(layer, q.shape, o)?;
        if q.shape[2] == 0 {
            return Ok(());
        }
        qpos.iter_mut().for_each(|p| *p -= mk.lag as i32);
        let mut pages = Vec::new();
        let mut off = vec![0i32];
        let mut most = 0;
        for s in &self.layers[layer] {
            let n0 = pages.len();
            for p in s.all_pages().filter(|p| p.live() > 0) {
                pages.push(abi::RkvPage {
                    data: p.dev_ptr(),
                    cls: class_index(p.bits) as i32,
                    start: p.start as i32,
                    len: p.len as i32,
                    pad: 0,
                });
            }
            most = most.max(pages.len() - n0);
            off.push(pages.len() as i32);
        }
        let list = PageList {
            pages: &pages,
            off: &off,
            most,
        };
        let io = AttendIo {
            q,
            out,
            lse,
            perm: dev.perm[layer].ptr,
            inv_freq: dev.inv_freq.as_ref().map_or(0, |x| x.ptr),
        };
        crate::cuda::launch::attend(
            &dev.backend,
            &self.meta,
            &KvSource::Pages(&list, &qpos),
            &io,
            o.causal,
            o.softcap,
            &mk,
        )
    }

    /// Sets the most tokens one sequence may hold in one layer (`None`: unbounded); appends
    /// past it fail with a `Capacity` error and change nothing. A limit below what a sequence
    /// already holds is refused.
    pub fn set_max_tokens(&mut self, max_tokens: Option<usize>) -> Result<()> {
        if let Some(cap) = max_tokens {
            let held = self
                .layers
                .iter()
                .flatten()
                .map(Seq::len)
                .max()
                .unwrap_or(0);
            if cap == 0 || held > cap {
                return Err(Error::value(
                    "max_tokens",
                    format!("at least 1 and at least the {held} tokens a sequence holds"),
                    cap.to_string(),
                ));
            }
        }
        self.meta.max_tokens = max_tokens;
        Ok(())
    }

    /// Checks a layer index.
    pub fn check_layer(&self, layer: i64) -> Result<usize> {
        if layer < 0 || layer as usize >= self.meta.num_layers {
            return Err(Error::value(
                "layer",
                format!("0 <= layer < {}", self.meta.num_layers),
                layer.to_string(),
            ));
        }
        Ok(layer as usize)
    }

    /// Tokens stored per sequence in a layer.
    pub fn seq_lens(&self, layer: usize) -> Vec<usize> {
        self.layers[layer].iter().map(|s| s.len()).collect()
    }

    /// Allocated bytes of every page (pages shared after `reorder` counted once).
    pub fn nbytes(&self) -> usize {
        let mut seen = HashSet::new();
        let mut total = 0;
        for seq in self.layers.iter().flatten() {
            for p in seq.all_pages() {
                if seen.insert(Arc::as_ptr(p)) {
                    total += p.nbytes();
                }
            }
        }
        total
    }

    /// Bytes the stored tokens occupy (codes, scales, zeros, positions, tags), page slack
    /// excluded; shared pages counted per sequence.
    pub fn payload_bytes(&self) -> f64 {
        self.layers
            .iter()
            .flatten()
            .flat_map(|s| s.all_pages())
            .map(|p| p.live() as f64 * self.meta.layout(p.bits).token_payload_bytes())
            .sum()
    }

    /// Stored tokens over all layers and sequences.
    pub fn total_tokens(&self) -> usize {
        self.layers.iter().flatten().map(|s| s.len()).sum()
    }

    /// Bits per stored K or V element, scales, zeros, positions and 16-bit tokens included.
    pub fn bits_per_element(&self) -> f64 {
        let n = self.total_tokens();
        if n == 0 {
            return 0.0;
        }
        self.payload_bytes() * 8.0 / (n as f64 * self.meta.heads as f64 * self.meta.d as f64 * 2.0)
    }

    /// [`Self::bits_per_element`] with each recent-window token counted at the width it is
    /// stored in once it leaves the window (its tag): the steady state, in which
    /// bit-allocation budgets are stated.
    pub fn settled_bits_per_element(&self) -> f64 {
        let n = self.total_tokens();
        if n == 0 {
            return 0.0;
        }
        let m = &self.meta;
        let mut bytes = 0.0;
        for seq in self.layers.iter().flatten() {
            for p in &seq.pages {
                bytes += p.live() as f64 * m.layout(p.bits).token_payload_bytes();
            }
            for p in &seq.window {
                for &tag in &p.tags()[p.start..p.len] {
                    let bits = if matches!(tag, 2 | 3 | 4 | 8) {
                        tag
                    } else {
                        m.cfg.bits
                    };
                    bytes += m.layout(bits).token_payload_bytes();
                }
            }
        }
        bytes * 8.0 / (n as f64 * m.heads as f64 * m.d as f64 * 2.0)
    }

    /// Bits per K/V element of one token stored in precision class `bits` (codes, scales,
    /// zeros, position and tag): what [`Self::bits_per_element`] counts for it, so that
    /// bit-allocation policies can meet a budget stated in those units.
    pub fn class_bits(&self, bits: u8) -> Result<f64> {
        check_bits("bits", bits)?;
        let m = &self.meta;
        Ok(m.layout(bits).token_payload_bytes() * 8.0 / (m.heads as f64 * m.d as f64 * 2.0))
    }

    /// Validates everything about an append before anything changes.
    fn validate_append(&self, layer: usize, a: &AppendArgs) -> Result<(usize, usize)> {
        if self.dev.is_some() {
            return Err(Error::device(format!(
                "k: this store lives on {}: pass device tensors",
                self.device_name()
            )));
        }
        let (b, t) = self.validate_tokens(layer, a.k.shape, a.v.shape, &a.tokens())?;
        let m = &self.meta;
        // Non-finite keys or values would poison a whole quantization group; values beyond
        // fp16's range cannot be represented by fp16 scales and zeros (nor by fp16 tokens).
        // Only tokens kept in bfloat16 (16-bit class with fp_format bfloat16) escape the bound.
        let mut row = vec![0f32; m.d];
        let bf16 = m.cfg.fp_format == FpFormat::BF16;
        for (name, v) in [("k", &a.k), ("v", &a.v)] {
            for bi in 0..b {
                for h in 0..m.heads {
                    for ti in 0..t {
                        let idx = bi * t + ti;
                        if a.valid.is_some_and(|vv| !vv[idx]) {
                            continue;
                        }
                        v.read_row(bi, h, ti, &mut row);
                        if let Some(x) = row.iter().find(|x| !x.is_finite()) {
                            return Err(Error::value(
                                name,
                                "finite values",
                                format!("{x} at [{bi}, {h}, {ti}]"),
                            ));
                        }
                        let wide = bf16
                            && (a.protect.is_some_and(|p| p[idx])
                                || a.bits.map_or(m.cfg.bits, |b| b[idx]) == 16);
                        if !wide {
                            if let Some(x) = row.iter().find(|x| x.abs() > 65504.0) {
                                return Err(Error::value(
                                    name,
                                    "values within ±65504 (fp16 scales, zeros and tokens; use fp_format='bfloat16' with 16-bit tokens for wider ranges)",
                                    format!("{x} at [{bi}, {h}, {ti}]"),
                                ));
                            }
                        }
                    }
                }
            }
        }
        Ok((b, t))
    }

    /// Checks shapes, per-token arguments and capacity (everything but the values).
    fn validate_tokens(
        &self,
        layer: usize,
        kshape: [usize; 4],
        vshape: [usize; 4],
        a: &TokenArgs,
    ) -> Result<(usize, usize)> {
        let m = &self.meta;
        let want = |t: usize| [m.batch, m.heads, t, m.d];
        let t = kshape[2];
        for (name, shape) in [("k", kshape), ("v", vshape)] {
            if shape != want(t) {
                return Err(Error::shape(
                    name,
                    format!("[B={}, Hkv={}, T={t}, D={}]", m.batch, m.heads, m.d),
                    shape_str(&shape),
                ));
            }
        }
        if t > 1 << 24 {
            return Err(Error::value(
                "k",
                "at most 2^24 tokens per append",
                t.to_string(),
            ));
        }
        let b = m.batch;
        if let Some(p) = a.positions {
            check_positions(p, b, t, "T")?;
        }
        for (name, len) in [
            ("protect", a.protect.map(|x| x.len())),
            ("valid", a.valid.map(|x| x.len())),
            ("bits", a.bits.map(|x| x.len())),
        ] {
            if let Some(len) = len {
                if len != b * t {
                    return Err(Error::shape(
                        name,
                        format!("[B={b}, T={t}]"),
                        format!("{len} elements"),
                    ));
                }
            }
        }
        if let Some(bits) = a.bits {
            for &x in bits {
                check_bits("bits", x)?;
            }
        }
        if let Some(cap) = m.max_tokens {
            for (bi, s) in self.layers[layer].iter().enumerate() {
                let valid = a.valid.map_or(t, |v| {
                    v[bi * t..(bi + 1) * t].iter().filter(|x| **x).count()
                });
                if s.len() + valid > cap {
                    return Err(Error::Capacity {
                        msg: format!(
                            "sequence {bi} of layer {layer} holds {} tokens; {valid} more would pass max_tokens = {cap}",
                            s.len()
                        ),
                    });
                }
            }
        }
        // Default positions must stay in range too.
        if a.positions.is_none() {
            for s in &self.layers[layer] {
                if s.next_pos + t as i64 >= i32::MAX as i64 {
                    return Err(Error::value(
                        "positions",
                        "positions below 2^31 - 1",
                        "overflow",
                    ));
                }
            }
        }
        Ok((b, t))
    }

    /// Appends `T` tokens to every sequence of `layer`. On error nothing changes.
    pub fn append(&mut self, layer: usize, a: &AppendArgs) -> Result<()> {
        let (_, t) = self.validate_append(layer, a)?;
        if t == 0 {
            return Ok(());
        }
        // Default positions continue each sequence, per layer.
        let meta = &self.meta;
        let tok = a.tokens();
        self.layers[layer]
            .par_iter_mut()
            .enumerate()
            .try_for_each(|(b, seq)| {
                let mut row = vec![0f32; meta.d];
                let stage = |st: &mut Staged, ti: usize| {
                    for h in 0..meta.heads {
                        a.k.read_row(b, h, ti, &mut row);
                        st.k.extend_from_slice(&row);
                    }
                    for h in 0..meta.heads {
                        a.v.read_row(b, h, ti, &mut row);
                        st.v.extend_from_slice(&row);
                    }
                };
                append_seq(meta, layer, seq, b, t, &tok, stage, &mut DevOps::default())
            })
    }

    /// [`KVStore::append`] for a device store: `k` and `v` are device tensors; the tokens
    /// are rotated, quantized and packed on the device in one launch per layer.
    pub fn append_device(&mut self, layer: usize, a: &DevAppendArgs) -> Result<()> {
        let Some(dev) = &self.dev else {
            return Err(Error::device(
                "k: this store lives on the CPU: pass CPU tensors",
            ));
        };
        let backend = dev.backend.clone();
        let (b, t) = self.validate_tokens(layer, a.k.shape, a.v.shape, &a.tokens)?;
        if t == 0 {
            return Ok(());
        }
        let meta = &self.meta;
        let mut ops = DevOps {
            backend: Some(backend.clone()),
            ..Default::default()
        };
        let size = |d: DType| if d == DType::F32 { 4u64 } else { 2 };
        for (bi, seq) in self.layers[layer].iter_mut().enumerate().take(b) {
            let stage = |st: &mut Staged, ti: usize| {
                let at = |x: &DevTensor| {
                    x.ptr + ((bi * x.strides[0] + ti * x.strides[2]) as u64) * size(x.dtype)
                };
                st.src.push(RkvSrc {
                    k: at(&a.k),
                    v: at(&a.v),
                    k_sh: a.k.strides[1] as i64,
                    k_sc: a.k.strides[3] as i64,
                    v_sh: a.v.strides[1] as i64,
                    v_sc: a.v.strides[3] as i64,
                    dtype: dtype_code(a.k.dtype),
                    round: 0,
                });
            };
            append_seq(meta, layer, seq, bi, t, &a.tokens, stage, &mut ops)?;
        }
        let dev = self.dev.as_ref().expect("device store");
        flush_device(meta, dev, layer, &mut ops)
    }

    /// The device the pages live on: `"cpu"`, `"cuda:N"` or `"emu"`.
    pub fn device_name(&self) -> String {
        self.dev
            .as_ref()
            .map_or_else(|| "cpu".to_string(), |d| d.backend.name())
    }

    /// A copy of this store with its pages on `backend`.
    pub fn to_device(&self, backend: &Arc<dyn Backend>) -> Result<KVStore> {
        let m = &self.meta;
        let mut perm = Vec::new();
        for p in &m.plan.key_perm {
            let bytes: Vec<u8> = p.iter().flat_map(|x| x.to_le_bytes()).collect();
            let buf = DevBuf::new(backend.clone(), bytes.len().max(4))?;
            backend.h2d(buf.ptr, &bytes)?;
            perm.push(buf);
        }
        let inv_freq = match &m.rope {
            Some(r) => {
                let bytes: Vec<u8> = r.inv_freq.iter().flat_map(|x| x.to_le_bytes()).collect();
                let buf = DevBuf::new(backend.clone(), bytes.len())?;
                backend.h2d(buf.ptr, &bytes)?;
                Some(buf)
            }
            None => None,
        };
        let layers = self.map_pages(|p| p.to_device(m.layout(p.bits), backend.clone()))?;
        Ok(KVStore {
            meta: m.clone(),
            layers,
            dev: Some(DeviceState {
                backend: backend.clone(),
                perm,
                inv_freq,
            }),
        })
    }

    /// A copy of this store with its pages in host memory.
    pub fn to_host(&self) -> Result<KVStore> {
        if self.dev.is_none() {
            return Ok(self.clone());
        }
        let m = &self.meta;
        let layers = self.map_pages(|p| p.to_host(m.layout(p.bits)))?;
        Ok(KVStore {
            meta: m.clone(),
            layers,
            dev: None,
        })
    }

    /// Every sequence with each page (window included) replaced by `f(page)`.
    fn map_pages(&self, f: impl Fn(&Page) -> Result<Page>) -> Result<Vec<Vec<Seq>>> {
        let conv = |p: &Arc<Page>| f(p).map(Arc::new);
        self.layers
            .iter()
            .map(|l| {
                l.iter()
                    .map(|s| {
                        Ok(Seq {
                            pages: s.pages.iter().map(conv).collect::<Result<_>>()?,
                            window: s.window.iter().map(conv).collect::<Result<_>>()?,
                            ..s.clone()
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// Beam-search reorder: sequence `i` becomes old sequence `indices[i]` in every layer.
    pub fn reorder(&mut self, indices: &[i64]) -> Result<()> {
        let b = self.meta.batch;
        if indices.len() != b {
            return Err(Error::shape(
                "indices",
                format!("[{b}]"),
                format!("[{}]", indices.len()),
            ));
        }
        if let Some(x) = indices.iter().find(|x| !(0..b as i64).contains(*x)) {
            return Err(Error::value(
                "indices",
                format!("0 <= index < {b}"),
                x.to_string(),
            ));
        }
        for layer in &mut self.layers {
            let old = std::mem::take(layer);
            *layer = indices.iter().map(|&i| old[i as usize].clone()).collect();
        }
        Ok(())
    }

    /// Drops every token whose position is `>= length` (per sequence: `lengths[b]`, or one
    /// length for all).
    pub fn truncate(&mut self, lengths: &[i64]) -> Result<()> {
        let b = self.meta.batch;
        if lengths.len() != b && lengths.len() != 1 {
            return Err(Error::shape(
                "length",
                format!("an int or [{b}]"),
                format!("[{}]", lengths.len()),
            ));
        }
        if let Some(x) = lengths.iter().find(|x| **x < 0) {
            return Err(Error::value("length", ">= 0", x.to_string()));
        }
        let meta = &self.meta;
        for layer in &mut self.layers {
            for (i, seq) in layer.iter_mut().enumerate() {
                let len = lengths[if lengths.len() == 1 { 0 } else { i }];
                truncate_seq(meta, seq, len)?;
            }
        }
        Ok(())
    }

    /// Removes every token (the store keeps its settings).
    pub fn clear(&mut self) {
        for seq in self.layers.iter_mut().flatten() {
            *seq = Seq::default();
        }
    }

    /// Positions, keys and values of sequence `b` of `layer`, dequantized back to the basis
    /// they were appended in (pre-RoPE keys in `pre_rope` mode), `[n][Hkv*D]`, page by page
    /// (window last). A debugging and testing aid built on the plain reference unpacker, not
    /// on the attention kernels; it materializes what attention never does.
    pub fn dequantize(&self, layer: usize, b: usize) -> (Vec<i32>, Vec<f32>, Vec<f32>) {
        let m = &self.meta;
        let seq = &self.layers[layer][b];
        let hd = m.heads * m.d;
        let (mut pos, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
        for page in seq.all_pages() {
            let lay = m.layout(page.bits);
            for u in page.start..page.len {
                pos.push(page.positions()[u]);
                let (k, v) = read_slot_ref(m, layer, page, lay, u);
                debug_assert_eq!(k.len(), hd);
                ks.extend(k);
                vs.extend(v);
            }
        }
        (pos, ks, vs)
    }
}

/// Reference reader of one slot: keys and values `[Hkv*D]` in the appended basis.
fn read_slot_ref(
    m: &Meta,
    layer: usize,
    page: &Page,
    lay: &Layout,
    u: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (d, cap, heads) = (m.d, lay.cap, m.heads);
    let mut k = vec![0f32; heads * d];
    let mut v = vec![0f32; heads * d];
    let mut codes = vec![0u8; cap.max(d)];
    for h in 0..heads {
        let base = lay.head(h);
        if page.bits == 16 {
            let kk = page.u16s(base, d * cap);
            let vv = page.u16s(base + lay.v_codes, cap * d);
            for c in 0..d {
                k[h * d + c] = m.cfg.fp_format.decode(kk[c * cap + u]);
                v[h * d + c] = m.cfg.fp_format.decode(vv[u * d + c]);
            }
            continue;
        }
        let ng = d / m.group;
        for c in 0..d {
            let off = base + c * lay.k_row;
            unpack_row(
                &page.bytes()[off..off + lay.k_row],
                page.bits,
                &mut codes[..cap],
            );
            let (s, z) = if lay.per_channel {
                (
                    page.u16s(base + lay.k_scale, d)[c],
                    page.u16s(base + lay.k_zero, d)[c],
                )
            } else {
                let gi = c / m.group;
                (
                    page.u16s(base + lay.k_scale, ng * cap)[gi * cap + u],
                    page.u16s(base + lay.k_zero, ng * cap)[gi * cap + u],
                )
            };
            k[h * d + c] = codes[u] as f32 * f16_to_f32(s) + f16_to_f32(z);
        }
        let off = base + lay.v_codes + u * lay.v_row;
        unpack_row(
            &page.bytes()[off..off + lay.v_row],
            lay.vbits,
            &mut codes[..d],
        );
        for c in 0..d {
            let gi = c / m.group;
            let s = page.u16s(base + lay.v_scale, cap * ng)[u * ng + gi];
            let z = page.u16s(base + lay.v_zero, cap * ng)[u * ng + gi];
            v[h * d + c] = codes[c] as f32 * f16_to_f32(s) + f16_to_f32(z);
        }
    }
    if page.bits == 16 {
        return (k, v);
    }
    // Undo the key basis: stored[j] = (H k)[perm[j]].
    let n = m.plan.group_len();
    let perm = &m.plan.key_perm[layer];
    for (g, grp) in k.chunks_exact_mut(n).enumerate() {
        let mut y = vec![0f32; n];
        for (j, val) in grp.iter().enumerate() {
            y[perm[g * n + j] as usize] = *val;
        }
        if let Some(h) = &m.had_k {
            h.inverse(&mut y);
        }
        grp.copy_from_slice(&y);
    }
    if let Some(h) = &m.had_v {
        for vh in v.chunks_exact_mut(d) {
            h.inverse(vh);
        }
    }
    (k, v)
}

/// A new empty page of `lay`, on the device when `ops` has one.
fn new_page(lay: &Layout, ops: &DevOps) -> Result<Page> {
    match &ops.backend {
        Some(b) => Page::new_device(lay, b.clone()),
        None => Ok(Page::new(lay)),
    }
}

fn open_page<'s>(m: &Meta, seq: &'s mut Seq, bits: u8, ops: &DevOps) -> Result<&'s mut Page> {
    let ci = class_index(bits);
    let ok = seq.open[ci].is_some_and(|i| {
        i < seq.pages.len() && seq.pages[i].bits == bits && seq.pages[i].has_room()
    });
    if !ok {
        // After a truncate the cached index is gone: reuse a page that still has room.
        seq.open[ci] = seq
            .pages
            .iter()
            .rposition(|p| p.bits == bits && p.has_room());
        if seq.open[ci].is_none() {
            seq.pages.push(Arc::new(new_page(m.layout(bits), ops)?));
            seq.open[ci] = Some(seq.pages.len() - 1);
        }
    }
    let i = seq.open[ci].unwrap_or_default();
    Ok(Arc::make_mut(&mut seq.pages[i]))
}

/// Queues the device writes of staged tokens `r` into `page` (slots from `page.len`).
fn queue_device(ops: &mut DevOps, page: &Page, st: &Staged, r: std::ops::Range<usize>) {
    let cls = class_index(page.bits);
    let per_channel = page.bits < 16 && page.closed;
    let row0 = ops.key_rows;
    for (j, i) in r.enumerate() {
        let key_row = if per_channel {
            ops.key_rows += 1;
            ops.key_rows - 1
        } else {
            -1
        };
        ops.dsts.push(RkvDst {
            page: page.dev_ptr(),
            cls: cls as i32,
            slot: (page.len + j) as i32,
            pos: st.pos[i],
            tag: st.tag[i] as i32,
            key_row,
            pad: 0,
        });
        ops.srcs.push(st.src[i]);
    }
    if per_channel {
        ops.channel.push((page.dev_ptr(), cls, row0));
    }
}

/// Writes staged tokens (all of one class) into that class's pages.
fn put(
    m: &Meta,
    layer: usize,
    seq: &mut Seq,
    st: &Staged,
    bits: u8,
    ops: &mut DevOps,
) -> Result<()> {
    let n = st.len();
    if n == 0 {
        return Ok(());
    }
    let hd = m.heads * m.d;
    let lay = m.layout(bits).clone();
    let (kclip, vclip) = m.clips(layer);
    let mut done = 0;
    while done < n {
        let per_channel = bits < 16 && lay.per_channel;
        let page = if per_channel {
            seq.pages.push(Arc::new(new_page(&lay, ops)?));
            let i = seq.pages.len() - 1;
            Arc::make_mut(&mut seq.pages[i])
        } else {
            open_page(m, seq, bits, ops)?
        };
        let take = (page.cap - page.len).min(n - done);
        let r = done..done + take;
        if ops.backend.is_some() {
            // Per-channel pages are written whole: mark before queueing (see queue_device).
            page.closed |= per_channel;
            queue_device(ops, page, st, r.clone());
            page.write_meta(&st.pos[r.clone()], &st.tag[r]);
            done += take;
            continue;
        }
        let k = &st.k[r.start * hd..r.end * hd];
        let mut v = st.v[r.start * hd..r.end * hd].to_vec();
        let keys = if bits == 16 {
            m.keys_raw_cm(k, take)
        } else {
            m.keys_to_stored(layer, k, take)
        };
        if bits < 16 {
            if let Some(h) = &m.had_v {
                v.chunks_exact_mut(m.d).for_each(|x| h.forward(x));
            }
        }
        let chunk = Chunk {
            keys: &keys,
            values: &v,
            n: take,
        };
        let u0 = page.len;
        match (bits, per_channel) {
            (16, _) => write_fp(page.bytes_mut(), &lay, u0, &chunk, m.cfg.fp_format),
            (_, true) => {
                write_quant_per_channel(page.bytes_mut(), &lay, &chunk, kclip, vclip);
                page.closed = true;
            }
            _ => write_quant_per_token(page.bytes_mut(), &lay, u0, &chunk, kclip, vclip),
        }
        page.write_meta(&st.pos[r.clone()], &st.tag[r]);
        done += take;
    }
    Ok(())
}

/// Writes staged tokens into the window's pages.
fn put_window(m: &Meta, seq: &mut Seq, st: &Staged, ops: &mut DevOps) -> Result<()> {
    let hd = m.heads * m.d;
    let lay = m.layout(16).clone();
    let mut done = 0;
    while done < st.len() {
        if !seq.window.back().is_some_and(|p| p.has_room()) {
            seq.window.push_back(Arc::new(new_page(&lay, ops)?));
        }
        let page = Arc::make_mut(seq.window.back_mut().expect("window page"));
        let take = (page.cap - page.len).min(st.len() - done);
        let r = done..done + take;
        if ops.backend.is_some() {
            queue_device(ops, page, st, r.clone());
            page.write_meta(&st.pos[r.clone()], &st.tag[r]);
            done += take;
            continue;
        }
        let keys = m.keys_raw_cm(&st.k[r.start * hd..r.end * hd], take);
        let chunk = Chunk {
            keys: &keys,
            values: &st.v[r.start * hd..r.end * hd],
            n: take,
        };
        let u0 = page.len;
        write_fp(page.bytes_mut(), &lay, u0, &chunk, m.cfg.fp_format);
        page.write_meta(&st.pos[r.clone()], &st.tag[r]);
        done += take;
    }
    Ok(())
}

/// Takes the `n` oldest window tokens out of the window: decoded to f32, or on a device
/// store as references to their 16-bit slots.
fn drain_window(m: &Meta, seq: &mut Seq, mut n: usize, into: &mut Staged, ops: &mut DevOps) {
    let (d, heads) = (m.d, m.heads);
    let fmt = m.cfg.fp_format;
    let lay = m.layout(16);
    while n > 0 {
        let Some(front) = seq.window.front_mut() else {
            break;
        };
        if front.live() == 0 {
            // Emptied by a truncate (it may still have room): nothing to drain here.
            seq.window.pop_front();
            continue;
        }
        let page = Arc::make_mut(front);
        let take = page.live().min(n);
        for u in page.start..page.start + take {
            if let Some(dev) = page.dev.as_ref() {
                // Slot u: keys channel-major [D][cap] per head, values [cap][D] per head.
                let base = dev.ptr + lay.head_off as u64;
                into.src.push(RkvSrc {
                    k: base + 2 * u as u64,
                    v: base + (lay.v_codes + 2 * u * d) as u64,
                    k_sh: (lay.head_bytes / 2) as i64,
                    k_sc: lay.cap as i64,
                    v_sh: (lay.head_bytes / 2) as i64,
                    v_sc: 1,
                    dtype: abi::fp_code(fmt),
                    round: 0,
                });
            } else {
                for h in 0..heads {
                    let base = lay.head(h);
                    let kk = page.u16s(base, d * lay.cap);
                    into.k
                        .extend((0..d).map(|c| fmt.decode(kk[c * lay.cap + u])));
                }
                for h in 0..heads {
                    let base = lay.head(h);
                    let vv = page.u16s(base + lay.v_codes, lay.cap * d);
                    into.v
                        .extend(vv[u * d..(u + 1) * d].iter().map(|x| fmt.decode(*x)));
                }
            }
            into.pos.push(page.positions()[u]);
            // Window tags are target widths; anything else (a damaged file) falls back to
            // the store's default rather than reaching the quantizers.
            let tag = page.tags()[u];
            into.tag.push(if matches!(tag, 2 | 3 | 4 | 8) {
                tag
            } else {
                m.cfg.bits
            });
        }
        page.start += take;
        n -= take;
        if page.live() == 0 {
            if let Some(p) = seq.window.pop_front() {
                if ops.backend.is_some() {
                    ops.keep.push(p);
                }
            }
        } else {
            page.refresh_range();
        }
    }
}

fn window_len(seq: &Seq) -> usize {
    seq.window.iter().map(|p| p.live()).sum()
}

/// Appends sequence `b`'s tokens; `stage` copies token `ti`'s rows (or their addresses,
/// on a device store) into a staging list.
#[allow(clippy::too_many_arguments)]
fn append_seq(
    m: &Meta,
    layer: usize,
    seq: &mut Seq,
    b: usize,
    t: usize,
    a: &TokenArgs,
    mut stage: impl FnMut(&mut Staged, usize),
    ops: &mut DevOps,
) -> Result<()> {
    let hd = m.heads * m.d;
    let (mut direct16, mut windowed) = (Staged::default(), Staged::default());
    // Ordered by class, so that pages (and the order attention sums them in) do not depend
    // on hash order: the same appends give bit-identical stores and outputs.
    let mut direct: BTreeMap<u8, Staged> = BTreeMap::new();
    let mut next = seq.next_pos;
    let use_window = m.uses_window();
    let fmt = m.cfg.fp_format;
    for ti in 0..t {
        let idx = b * t + ti;
        if a.valid.is_some_and(|v| !v[idx]) {
            continue;
        }
        let pos = match a.positions {
            Some(p) if p.len() == t => p[ti],
            Some(p) => p[idx],
            None => next,
        };
        next = next.max(pos + 1);
        let protect = a.protect.is_some_and(|p| p[idx]);
        let bits = a.bits.map_or(m.cfg.bits, |x| x[idx]);
        let (dst, tag) = if protect || bits == 16 {
            (&mut direct16, 16u8)
        } else if use_window {
            (&mut windowed, bits)
        } else {
            (direct.entry(bits).or_default(), bits)
        };
        stage(dst, ti);
        dst.pos.push(pos as i32);
        dst.tag.push(tag);
    }
    seq.next_pos = next;
    put(m, layer, seq, &direct16, 16, ops)?;
    for (bits, st) in &direct {
        put(m, layer, seq, st, *bits, ops)?;
    }
    if windowed.len() == 0 {
        return Ok(());
    }
    // How many of (window + new) leave the window now.
    let w0 = window_len(seq);
    let total = w0 + windowed.len();
    let over = total.saturating_sub(m.cfg.residual);
    let leave = match m.cfg.key_layout {
        KeyLayout::PerToken => over,
        KeyLayout::PerChannel => over / m.cap * m.cap,
    };
    let mut out = Staged::default();
    drain_window(m, seq, leave.min(w0), &mut out, ops);
    let from_new = leave.saturating_sub(w0);
    for i in 0..from_new {
        out.push_from(&windowed, i, hd);
    }
    // Tokens leaving at once are rounded as if they had waited in the window.
    let n_old = out.len() - from_new;
    if ops.backend.is_some() {
        out.src[n_old..].iter_mut().for_each(|s| s.round = 1);
    } else {
        out.k[n_old * hd..]
            .iter_mut()
            .for_each(|x| *x = fmt.round(*x));
        out.v[n_old * hd..]
            .iter_mut()
            .for_each(|x| *x = fmt.round(*x));
    }
    let mut rest = Staged::default();
    for i in from_new..windowed.len() {
        rest.push_from(&windowed, i, hd);
    }
    put_window(m, seq, &rest, ops)?;
    let mut by_class: BTreeMap<u8, Staged> = BTreeMap::new();
    for i in 0..out.len() {
        by_class
            .entry(out.tag[i])
            .or_default()
            .push_from(&out, i, hd);
    }
    for (bits, st) in &by_class {
        put(m, layer, seq, st, *bits, ops)?;
    }
    Ok(())
}

/// Uploads a host array into scratch device memory.
fn upload<T: bytemuck::Pod>(b: &Arc<dyn Backend>, x: &[T]) -> Result<u64> {
    let bytes: &[u8] = bytemuck::cast_slice(x);
    let p = b.temp(bytes.len())?;
    b.h2d(p, bytes)?;
    Ok(p)
}

/// Launches the queued writes of one append (all sequences of a layer at once).
fn flush_device(m: &Meta, dev: &DeviceState, layer: usize, ops: &mut DevOps) -> Result<()> {
    let b = &dev.backend;
    if ops.dsts.is_empty() {
        return Ok(());
    }
    let kclip = m.clips(layer).0;
    let lay = abi::layouts(m);
    let mut temps = Vec::new();
    let res = (|| -> Result<()> {
        let src = upload(b, &ops.srcs)?;
        temps.push(src);
        let dst = upload(b, &ops.dsts)?;
        temps.push(dst);
        let key_out = if ops.key_rows > 0 {
            let p = b.temp(ops.key_rows as usize * m.heads * m.d * 4)?;
            temps.push(p);
            p
        } else {
            0
        };
        let p = abi::RkvAppendParams {
            src,
            dst,
            perm: dev.perm[layer].ptr,
            key_out,
            n_tok: ops.dsts.len() as i32,
            heads: m.heads as i32,
            d: m.d as i32,
            group_heads: m.plan.group_heads as i32,
            pack: abi::RkvPack::of(m, layer),
            lay,
        };
        let (grid, smem) = abi::append_shape(m, ops.dsts.len());
        b.launch(crate::cuda::backend::Launch::Append(&p, grid, smem))?;
        if !ops.channel.is_empty() {
            let pages: Vec<abi::RkvPage> = ops
                .channel
                .iter()
                .map(|&(ptr, cls, row0)| abi::RkvPage {
                    data: ptr,
                    cls: cls as i32,
                    start: row0,
                    len: m.cap as i32,
                    pad: 0,
                })
                .collect();
            let pp = upload(b, &pages)?;
            temps.push(pp);
            let cp = abi::RkvChannelParams {
                keys: key_out,
                pages: pp,
                n_pages: pages.len() as i32,
                heads: m.heads as i32,
                d: m.d as i32,
                pad: 0,
                key_clip: kclip,
                pad1: 0.0,
                lay,
            };
            b.launch(crate::cuda::backend::Launch::Channel(&cp))?;
        }
        Ok(())
    })();
    for t in temps {
        b.free_temp(t);
    }
    ops.keep.clear();
    res
}

fn truncate_seq(m: &Meta, seq: &mut Seq, len: i64) -> Result<()> {
    let keep = |p: &Arc<Page>| (p.min_pos as i64) < len;
    let fix = |p: &mut Arc<Page>| -> Result<()> {
        if p.live() == 0 || (p.max_pos as i64) < len {
            return Ok(());
        }
        let lay = m.layout(p.bits).clone();
        // Compaction moves codes between slots: on a device page it runs on a host copy
        // that is written back (truncation is rare: speculative decoding, crop).
        let mut host = if p.dev.is_some() {
            Some(p.to_host(&lay)?)
        } else {
            None
        };
        let page = match host.as_mut() {
            Some(h) => h,
            None => Arc::make_mut(p),
        };
        let mut w = page.start;
        for u in page.start..page.len {
            if (page.positions()[u] as i64) < len {
                if w != u {
                    move_slot(page, &lay, u, w);
                }
                w += 1;
            }
        }
        page.len = w;
        page.refresh_range();
        if let Some(h) = host {
            let d = Arc::make_mut(p);
            let dev = d.dev.as_ref().expect("device page");
            dev.backend.h2d(dev.ptr, h.bytes())?;
            let dev = d.dev.take();
            *d = h.header_copy(&lay);
            d.dev = dev;
        }
        Ok(())
    };
    seq.pages.retain(|p| p.live() > 0 && keep(p));
    seq.pages.iter_mut().try_for_each(fix)?;
    seq.window.retain(|p| p.live() > 0 && keep(p));
    seq.window.iter_mut().try_for_each(fix)?;
    seq.open = [None; 5];
    seq.next_pos = seq.next_pos.min(len);
    Ok(())
}
