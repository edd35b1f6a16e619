//! Fused attention over the packed store (CPU).
//!
//! For a block of queries and a page of tokens, per head group: the page's keys are
//! dequantized into a small channel-major tile (`[channels][page tokens]`, L1-resident, never
//! the whole cache), brought back to the model's basis when needed (inverse permutation,
//! inverse Hadamard across the tile's rows, RoPE at each key's position in `pre_rope` mode),
//! and scored against the queries with vector operations across tokens. An online softmax
//! (fp32) then accumulates the page's values, dequantized one token row at a time. Values
//! stored rotated are summed in the rotated basis; the inverse rotation is applied once to
//! the output.
//!
//! When keys are rotated per head (`group_heads = 1`) and not pre-RoPE, queries are rotated
//! instead (`q̃ = P H q`, so `q̃ · k̃ = q · k`) and quantized tiles are used as stored.
//!
//! Work is split over sequences, query blocks and page ranges (split-K); partial softmax
//! states are merged exactly.

// Kernels index several arrays with one counter; iterator chains would hide that from
// LLVM's vectorizer and from the reader.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::cuda::abi;
use crate::cuda::backend::Launch;
use crate::error::{Error, Result};
use crate::hadamard::cols_raw_body;
use crate::page::{Layout, Page};
use crate::quant::{affine_scalar, unpack_row_f32};
use crate::rope::sincos_f32_angle;
use crate::rotation::Mode;
use crate::simd::{self, f16_to_f32, madd, Level};
use crate::store::{check_positions, class_index, dtype_code, DevTensor, KVStore, Meta};
use crate::tensor::{DType, OutData, View4};

/// What [`attend`] takes besides the layer and the output.
#[derive(Clone, Copy, Debug)]
pub struct AttendArgs<'a> {
    /// Queries `[B, Hq, Tq, D]` (RoPE already applied, as models compute them).
    pub q: View4<'a>,
    /// Query positions `[B*Tq]` or `[Tq]`; `None`: the last `Tq` positions of each sequence.
    pub positions: Option<&'a [i64]>,
    /// Mask keys whose position exceeds the query's.
    pub causal: bool,
    /// Score scale; `None`: `1/sqrt(D)`.
    pub scale: Option<f32>,
    /// Sliding window: a key is visible when `q_pos - k_pos < window`.
    pub window: Option<usize>,
    /// Logit soft-capping (`cap * tanh(s / cap)`, Gemma 2).
    pub softcap: Option<f32>,
    /// Also mask the keys within `lag` positions of the query (`q_pos - k_pos < lag`; needs
    /// `causal`): a caller that attends to a query's recent tokens in full precision reads
    /// only the older ones here and merges the two with the log-sum-exp ([`attend_lse`]).
    pub lag: usize,
}

/// Everything an attention call takes besides the query and output memory.
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    /// As in [`AttendArgs`].
    pub positions: Option<&'a [i64]>,
    /// As in [`AttendArgs`].
    pub causal: bool,
    /// As in [`AttendArgs`].
    pub scale: Option<f32>,
    /// As in [`AttendArgs`].
    pub window: Option<usize>,
    /// As in [`AttendArgs`].
    pub softcap: Option<f32>,
    /// As in [`AttendArgs`].
    pub lag: usize,
}

impl AttendArgs<'_> {
    fn options(&self) -> Options<'_> {
        Options {
            positions: self.positions,
            causal: self.causal,
            scale: self.scale,
            window: self.window,
            softcap: self.softcap,
            lag: self.lag,
        }
    }
}

/// Attention of a device store: `q` and `out` (`[B, Hq, Tq, D]`, same dtype) are device
/// tensors; the fused kernel reads the packed pages in place (split-K over pages, then one
/// combine launch), on the backend's current stream. `lse`, when given, is a contiguous
/// float32 device tensor `[B, Hq, Tq]` that receives each row's log-sum-exp (as in
/// [`attend_lse`]).
pub fn attend_device(
    store: &KVStore,
    layer: usize,
    q: &DevTensor,
    out: &DevTensor,
    lse: Option<&DevTensor>,
    o: &Options,
) -> Result<()> {
    let Some(dev) = &store.dev else {
        return Err(Error::device(
            "q: this store lives on the CPU: pass CPU tensors",
        ));
    };
    let m = &store.meta;
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
    let Some(Prepared {
        scale,
        qpos,
        window,
    }) = prepare(store, layer, q.shape, o)?
    else {
        return Ok(());
    };
    let [b, hq, tq, d] = q.shape;
    let mut pages = Vec::new();
    let mut off = vec![0i32];
    let mut most = 0;
    for s in &store.layers[layer] {
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
    let (rows, tile, smem) = abi::attend_tiles(m, hq, tq);
    let base = abi::attend_grid(m, hq, tq, rows, 1);
    let splits = abi::attend_splits(
        (base[1] * base[2]) as usize,
        most,
        2 * dev.backend.sm_count(),
    );
    let bk = &dev.backend;
    let mut temps = Vec::new();
    let res = (|| -> Result<()> {
        let up = |temps: &mut Vec<u64>, bytes: &[u8]| -> Result<u64> {
            let p = bk.temp(bytes.len().max(4))?;
            temps.push(p);
            bk.h2d(p, bytes)?;
            Ok(p)
        };
        let pages_d = up(&mut temps, bytemuck::cast_slice(&pages))?;
        let off_d = up(&mut temps, bytemuck::cast_slice(&off))?;
        let qpos_d = up(&mut temps, bytemuck::cast_slice(&qpos))?;
        let work = bk.temp(b * splits * hq * tq * (d + 2) * 4)?;
        temps.push(work);
        let rope = m.rope.as_ref();
        let strides = |t: &DevTensor| t.strides.map(|x| x as i64);
        let p = abi::RkvAttendParams {
            q: q.ptr,
            pages: pages_d,
            page_off: off_d,
            qpos: qpos_d,
            perm: dev.perm[layer].ptr,
            inv_freq: dev.inv_freq.as_ref().map_or(0, |x| x.ptr),
            work,
            q_s: strides(q),
            batch: b as i32,
            hq: hq as i32,
            tq: tq as i32,
            d: d as i32,
            heads: m.heads as i32,
            group_heads: m.plan.group_heads as i32,
            q_dtype: dtype_code(q.dtype),
            fp_format: abi::fp_code(m.cfg.fp_format),
            mode: abi::mode_code(m.plan.mode),
            rotate_keys: m.plan.rotates_keys() as i32,
            rotate_values: m.plan.rotate_values as i32,
            rot_half: rope.map_or(0, |r| r.half() as i32),
            causal: o.causal as i32,
            window: window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
            splits: splits as i32,
            rows_per_block: rows as i32,
            tile_tokens: tile as i32,
            pad0: 0,
            scale,
            softcap: o.softcap.unwrap_or(0.0),
            rope_scaling: rope.map_or(1.0, |r| r.scaling),
            pad1: 0.0,
            lay: abi::layouts(m),
        };
        let grid = abi::attend_grid(m, hq, tq, rows, splits);
        bk.launch(Launch::Attend(&p, grid, smem))?;
        let c = abi::RkvCombineParams {
            work,
            out: out.ptr,
            lse: lse.map_or(0, |l| l.ptr),
            o_s: strides(out),
            batch: b as i32,
            hq: hq as i32,
            tq: tq as i32,
            d: d as i32,
            splits: splits as i32,
            o_dtype: dtype_code(out.dtype),
            rotate_values: m.plan.rotate_values as i32,
            pad: 0,
        };
        bk.launch(Launch::Combine(&c))
    })();
    for t in temps {
        bk.free_temp(t);
    }
    res
}

/// `e^x` in f32 to ~1e-7 relative error, 0 below -87; branch-free so that it vectorizes.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let y = p * f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// Softmax state of one query row.
#[derive(Clone, Debug)]
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    /// `[rows][D]`, values summed in the appended basis.
    plain: Vec<f32>,
    /// `[rows][D]`, values summed in the rotated basis.
    rot: Vec<f32>,
}

impl Partial {
    fn new(rows: usize, d: usize) -> Self {
        Partial {
            m: vec![f32::NEG_INFINITY; rows],
            l: vec![0.0; rows],
            plain: vec![0.0; rows * d],
            rot: vec![0.0; rows * d],
        }
    }

    fn merge(&mut self, o: &Partial, d: usize) {
        for r in 0..self.m.len() {
            if o.m[r] == f32::NEG_INFINITY {
                continue;
            }
            let m = self.m[r].max(o.m[r]);
            let (a, b) = ((self.m[r] - m).exp(), (o.m[r] - m).exp());
            self.l[r] = self.l[r] * a + o.l[r] * b;
            for c in r * d..(r + 1) * d {
                self.plain[c] = self.plain[c] * a + o.plain[c] * b;
                self.rot[c] = self.rot[c] * a + o.rot[c] * b;
            }
            self.m[r] = m;
        }
    }
}

/// One unit of parallel work: a sequence, a block of queries, a range of pages.
struct Item {
    b: usize,
    tq0: usize,
    tqn: usize,
    p0: usize,
    p1: usize,
}

/// Everything the kernels read.
struct Ctx<'a> {
    meta: &'a Meta,
    layer: usize,
    pages: Vec<Vec<&'a Page>>,
    hq: usize,
    tq: usize,
    /// `[B][Hq][Tq][D]`, scaled.
    q: Vec<f32>,
    /// Rotated queries for quantized pages (fast path), same shape.
    q_rot: Option<Vec<f32>>,
    /// Rotated queries rounded to i16 pairs, for the VNNI path.
    q_int: Option<QInt>,
    qpos: Vec<i32>,
    causal: bool,
    window: Option<usize>,
    softcap: Option<f32>,
}

/// Runs attention for every query of `layer` and writes `[B, Hq, Tq, D]` into `out`.
pub fn attend(store: &KVStore, layer: usize, a: &AttendArgs, out: &mut OutData) -> Result<()> {
    attend_at(simd::level(), store, layer, a, out)
}

/// [`attend`] that also writes each row's log-sum-exp of its scaled (and capped) scores,
/// `lse: [B, Hq, Tq]` (`-inf` for a row that sees no key, whose output is 0), so that
/// attention over disjoint key sets can be merged exactly.
pub fn attend_lse(
    store: &KVStore,
    layer: usize,
    a: &AttendArgs,
    out: &mut OutData,
    lse: &mut [f32],
) -> Result<()> {
    attend_inner(simd::level(), store, layer, a, out, Some(lse))
}

/// [`attend`] at a given SIMD level (tests compare levels).
pub fn attend_at(
    level: Level,
    store: &KVStore,
    layer: usize,
    a: &AttendArgs,
    out: &mut OutData,
) -> Result<()> {
    attend_inner(level, store, layer, a, out, None)
}

fn attend_inner(
    level: Level,
    store: &KVStore,
    layer: usize,
    a: &AttendArgs,
    out: &mut OutData,
    mut lse: Option<&mut [f32]>,
) -> Result<()> {
    if store.dev.is_some() {
        return Err(Error::device(format!(
            "q: this store lives on {}: pass device tensors",
            store.device_name()
        )));
    }
    let m = &store.meta;
    let [b, hq, tq, d] = a.q.shape;
    if out.len() != b * hq * tq * d {
        return Err(Error::shape(
            "out",
            format!("{} elements", b * hq * tq * d),
            out.len().to_string(),
        ));
    }
    if let Some(l) = &lse {
        if l.len() != b * hq * tq {
            return Err(Error::shape(
                "lse",
                format!("{} elements", b * hq * tq),
                l.len().to_string(),
            ));
        }
    }
    let Some(Prepared {
        scale,
        qpos,
        window,
    }) = prepare(store, layer, a.q.shape, &a.options())?
    else {
        return Ok(());
    };
    let seqs = &store.layers[layer];
    let mut q = vec![0f32; b * hq * tq * d];
    for bi in 0..b {
        for h in 0..hq {
            for t in 0..tq {
                let o = ((bi * hq + h) * tq + t) * d;
                a.q.read_row(bi, h, t, &mut q[o..o + d]);
                q[o..o + d].iter_mut().for_each(|x| *x *= scale);
            }
        }
    }
    if let Some(x) = q.iter().find(|x| !x.is_finite()) {
        return Err(Error::value("q", "finite values", x.to_string()));
    }
    let plan = &m.plan;
    let fast = plan.mode != Mode::PreRope && plan.group_heads == 1;
    let q_rot = fast.then(|| {
        let gqa = hq / m.heads;
        let mut qr = q.clone();
        let perm = &plan.key_perm[layer];
        let mut y = vec![0f32; d];
        for (i, row) in qr.chunks_exact_mut(d).enumerate() {
            let kh = (i / tq) % hq / gqa;
            y.copy_from_slice(row);
            if let Some(h) = &m.had_k {
                h.forward(&mut y);
            }
            for (j, o) in row.iter_mut().enumerate() {
                *o = y[perm[kh * d + j] as usize];
            }
        }
        qr
    });
    let q_int = q_rot.as_ref().map(|qr| QInt::new(qr, d, m.group));
    let pages: Vec<Vec<&Page>> = seqs
        .iter()
        .map(|s| {
            s.all_pages()
                .map(|p| p.as_ref())
                .filter(|p| p.live() > 0)
                .collect()
        })
        .collect();
    let ctx = Ctx {
        meta: m,
        layer,
        pages,
        hq,
        tq,
        q,
        q_rot,
        q_int,
        qpos,
        causal: a.causal,
        window,
        softcap: a.softcap,
    };
    // Query blocks keep an item's rows (Hq * block) around 256; page ranges split the rest.
    let tqb = (256 / hq).clamp(1, tq);
    let nqb = tq.div_ceil(tqb);
    let threads = rayon::current_num_threads().max(1);
    let mut items = Vec::new();
    for bi in 0..b {
        let np = ctx.pages[bi].len();
        let want = (4 * threads).div_ceil(b * nqb);
        let splits = want.clamp(1, np.div_ceil(8).max(1));
        for qb in 0..nqb {
            let tq0 = qb * tqb;
            let tqn = tqb.min(tq - tq0);
            for s in 0..splits {
                items.push(Item {
                    b: bi,
                    tq0,
                    tqn,
                    p0: s * np / splits,
                    p1: (s + 1) * np / splits,
                });
            }
        }
    }
    let partials: Vec<Partial> = items
        .par_iter()
        .map(|it| run_item(level, &ctx, it))
        .collect();
    // Merge the splits of each (sequence, query block) and finish the rows.
    let mut i = 0;
    let mut row_out = vec![0f32; d];
    while i < items.len() {
        let mut j = i + 1;
        while j < items.len() && items[j].b == items[i].b && items[j].tq0 == items[i].tq0 {
            j += 1;
        }
        let mut acc = partials[i].clone();
        for p in &partials[i + 1..j] {
            acc.merge(p, d);
        }
        let it = &items[i];
        for h in 0..hq {
            for t in 0..it.tqn {
                let r = h * it.tqn + t;
                let l = acc.l[r];
                if l > 0.0 {
                    let rot = &mut acc.rot[r * d..(r + 1) * d];
                    if let Some(hv) = &m.had_v {
                        hv.inverse(rot);
                    }
                    for c in 0..d {
                        row_out[c] = (acc.plain[r * d + c] + rot[c]) / l;
                    }
                } else {
                    row_out.fill(0.0);
                }
                let at = (it.b * hq + h) * tq + it.tq0 + t;
                if let Some(x) = lse.as_deref_mut() {
                    x[at] = if l > 0.0 {
                        acc.m[r] + l.ln()
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                out.write(at * d, &row_out);
            }
        }
        i = j;
    }
    Ok(())
}

/// What the kernels mask and scale with, after [`prepare`].
struct Prepared {
    scale: f32,
    /// Query positions `[B*Tq]`, less the lag.
    qpos: Vec<i32>,
    /// The window about the shifted positions.
    window: Option<usize>,
}

/// Checks what every attention call takes besides the tensors' memory; `None` when there
/// are no queries.
fn prepare(
    store: &KVStore,
    layer: usize,
    shape: [usize; 4],
    a: &Options,
) -> Result<Option<Prepared>> {
    let m = &store.meta;
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
    if let Some(p) = a.positions {
        check_positions(p, b, tq, "Tq")?;
    }
    let scale = a.scale.unwrap_or(1.0 / (d as f32).sqrt());
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::value(
            "scale",
            "a finite value > 0",
            scale.to_string(),
        ));
    }
    if let Some(c) = a.softcap {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::value("softcap", "a finite value > 0", c.to_string()));
        }
    }
    if a.window == Some(0) {
        return Err(Error::value("window", ">= 1", "0"));
    }
    if a.lag > 0 && !a.causal {
        return Err(Error::value(
            "lag",
            "0 without causal masking",
            a.lag.to_string(),
        ));
    }
    if a.lag > i32::MAX as usize || a.window.is_some_and(|w| w <= a.lag) {
        return Err(Error::value(
            "lag",
            format!(
                "less than the window ({})",
                a.window.unwrap_or(i32::MAX as usize)
            ),
            a.lag.to_string(),
        ));
    }
    if tq == 0 {
        return Ok(None);
    }
    let seqs = &store.layers[layer];
    let mut qpos = vec![0i32; b * tq];
    for bi in 0..b {
        for t in 0..tq {
            qpos[bi * tq + t] = match a.positions {
                Some(p) if p.len() == tq => p[t] as i32,
                Some(p) => p[bi * tq + t] as i32,
                None => (seqs[bi].next_pos - tq as i64 + t as i64).max(0) as i32,
            };
        }
    }
    // Masks are all the kernels use query positions for (queries arrive with RoPE applied),
    // so a lag is a shift of the query positions; the window shrinks by as much to keep
    // `q_pos - k_pos < window` about the true position.
    if a.lag > 0 {
        qpos.iter_mut().for_each(|p| *p -= a.lag as i32);
    }
    Ok(Some(Prepared {
        scale,
        qpos,
        window: a.window.map(|w| w - a.lag),
    }))
}

/// Runs one work item at a SIMD level (the AVX-512 build also enables the VNNI path).
fn run_item(level: Level, ctx: &Ctx, it: &Item) -> Partial {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: only called below after `level` confirmed these CPU features.
        #[target_feature(
            enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi2"
        )]
        unsafe fn v512(ctx: &Ctx, it: &Item) -> Partial {
            run_item_body::<true, true>(ctx, it)
        }
        // SAFETY: as above.
        #[target_feature(enable = "avx2,fma,f16c,bmi2")]
        unsafe fn v256(ctx: &Ctx, it: &Item) -> Partial {
            run_item_body::<true, false>(ctx, it)
        }
        match level {
            // SAFETY: `level` is at most `simd::level()`, which checked these features.
            Level::Avx512 => return unsafe { v512(ctx, it) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { v256(ctx, it) },
            Level::Scalar => {}
        }
    }
    run_item_body::<false, false>(ctx, it)
}

#[inline(always)]
fn run_item_body<const FMA: bool, const VNNI: bool>(ctx: &Ctx, it: &Item) -> Partial {
    match ctx.meta.cap {
        32 => run_tiles::<FMA, VNNI, 32>(ctx, it),
        _ => run_tiles::<FMA, VNNI, 64>(ctx, it),
    }
}

/// Queries rounded to 16-bit integers for the VNNI scores: per row, `q ≈ scale * qi` with
/// `|qi| <= 32767` (a relative error of at most 2^-16 of the row's largest entry), packed in
/// pairs of consecutive channels; plus the exact f32 sum of each group's entries (the zero
/// term).
struct QInt {
    pairs: Vec<i32>,
    scale: Vec<f32>,
    gsum: Vec<f32>,
    /// Per row and group: `Σ (q - scale * qi)`, the rounding lost (given back with the mid
    /// code as the codes' mean, so that it does not bias every token of a group alike).
    lost: Vec<f32>,
}

impl QInt {
    fn new(q: &[f32], d: usize, group: usize) -> Self {
        let rows = q.len() / d;
        let ng = d / group;
        let mut pairs = vec![0i32; rows * d / 2];
        let mut scale = vec![0f32; rows];
        let mut gsum = vec![0f32; rows * ng];
        let mut lost = vec![0f32; rows * ng];
        for (r, row) in q.chunks_exact(d).enumerate() {
            let mx = row.iter().fold(0f32, |a, x| a.max(x.abs()));
            for (gi, grp) in row.chunks_exact(group).enumerate() {
                gsum[r * ng + gi] = grp.iter().sum();
            }
            let sc = mx / 32767.0;
            if !sc.is_normal() {
                // A zero or vanishingly small row: the integer part stays zero (scale 0)
                // and the exact zero term (gsum) carries what little there is.
                continue;
            }
            scale[r] = sc;
            for (j, pr) in row.chunks_exact(2).enumerate() {
                let a = (pr[0] / sc).round_ties_even().clamp(-32767.0, 32767.0);
                let b = (pr[1] / sc).round_ties_even().clamp(-32767.0, 32767.0);
                lost[r * ng + 2 * j / group] += (pr[0] - a * sc) + (pr[1] - b * sc);
                pairs[r * d / 2 + j] =
                    (a as i16 as u16 as u32 | ((b as i16 as u16 as u32) << 16)) as i32;
            }
        }
        QInt {
            pairs,
            scale,
            gsum,
            lost,
        }
    }
}

/// 16 bytes at `o0` and 16 at `o1`, widened to 32-bit lanes and paired: lane `j` holds byte
/// `j` of the first run in its low 16 bits and byte `j` of the second in its high 16 bits
/// (the operand layout of `vpdpwssd`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn pair16(bytes: &[u8], o0: usize, o1: usize) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let r0: &[u8; 16] = bytes[o0..o0 + 16].try_into().expect("16 bytes");
    let r1: &[u8; 16] = bytes[o1..o1 + 16].try_into().expect("16 bytes");
    // SAFETY: both references cover 16 readable bytes; the loads are unaligned.
    let (a, b) = unsafe {
        (
            _mm_loadu_si128(r0.as_ptr() as *const __m128i),
            _mm_loadu_si128(r1.as_ptr() as *const __m128i),
        )
    };
    _mm512_or_si512(
        _mm512_cvtepu8_epi32(a),
        _mm512_slli_epi32::<16>(_mm512_cvtepu8_epi32(b)),
    )
}

/// `dst[x][c] += Σ_t p[x][t] * v[t][c]` for up to four rows over a 2- or 4-bit page of 64
/// tokens whose value rows are one quantization group: with `v = s*code + z`, the weights
/// `p*s` are rounded per row to i16 (relative 2^-16 of the row's largest weight) and summed
/// against pairs of tokens' codes with `vpdpwssd`; the `p*z` term is summed in f32.
// SAFETY: callers must run on a CPU with AVX-512 F/BW and VNNI (the VNNI build of run_item).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn pv_vnni<const CAP: usize, const B: u8>(
    page: &Page,
    lay: &Layout,
    kh: usize,
    d: usize,
    p4: [&[f32; CAP]; 4],
    k: usize,
    dst: &mut [f32],
) {
    use std::arch::x86_64::*;
    debug_assert!(CAP == 64 && (B == 2 || B == 4));
    let base = lay.head(kh);
    let bytes = page.bytes();
    let s16 = page.u16s(base + lay.v_scale, CAP);
    let z16 = page.u16s(base + lay.v_zero, CAP);
    let vs: [f32; CAP] = std::array::from_fn(|t| f16_to_f32(s16[t]));
    let vz: [f32; CAP] = std::array::from_fn(|t| f16_to_f32(z16[t]));
    let mut wp = [[0i32; CAP]; 4];
    let mut wscale = [0f32; 4];
    let mut zsum = [0f32; 4];
    for x in 0..4 {
        let w: [f32; CAP] = std::array::from_fn(|t| p4[x][t] * vs[t]);
        let mx = w.iter().fold(0f32, |a, v| a.max(v.abs()));
        let sc = mx / 32767.0;
        zsum[x] = (0..CAP).map(|t| p4[x][t] * vz[t]).sum::<f32>();
        if !sc.is_normal() {
            // Weights this small (or none) contribute below f32 resolution: only the zero
            // term is kept, and a subnormal scale cannot divide them.
            continue;
        }
        wscale[x] = sc;
        // The rounding errors' mean over codes would add the same offset to every channel
        // (which an inverse Hadamard then piles into one output channel): give it back
        // exactly, using the mid code as that mean.
        let mid = ((1u32 << B) - 1) as f32 * 0.5;
        let mut lost = 0f32;
        for t in (0..CAP).step_by(2) {
            let a = (w[t] / sc).round_ties_even();
            let b = (w[t + 1] / sc).round_ties_even();
            lost += (w[t] - a * sc) + (w[t + 1] - b * sc);
            wp[x][t / 2] = (a as i16 as u16 as u32 | ((b as i16 as u16 as u32) << 16)) as i32;
        }
        zsum[x] += lost * mid;
    }
    let planes = 8 / B as usize;
    let v_row = lay.v_row;
    let mask = _mm512_set1_epi32(if B == 2 { 0x0003_0003 } else { 0x000F_000F });
    let (u0, u1) = (page.start & !1, (page.len + 1) & !1);
    for h in 0..v_row / 16 {
        let mut acc = [[_mm512_setzero_si512(); 4]; 4];
        for u in (u0..u1).step_by(2) {
            let o0 = base + lay.v_codes + u * v_row + h * 16;
            let w = pair16(bytes, o0, o0 + v_row);
            let wb: [__m512i; 4] = std::array::from_fn(|x| _mm512_set1_epi32(wp[x][u / 2]));
            for sp in 0..planes {
                let plane = _mm512_and_si512(
                    _mm512_srlv_epi32(w, _mm512_set1_epi32(sp as i32 * B as i32)),
                    mask,
                );
                for x in 0..4 {
                    acc[x][sp] = _mm512_dpwssd_epi32(acc[x][sp], plane, wb[x]);
                }
            }
        }
        for x in 0..k {
            for sp in 0..planes {
                let mut a = [0f32; 16];
                // SAFETY: `a` holds 16 f32.
                unsafe { _mm512_storeu_ps(a.as_mut_ptr(), _mm512_cvtepi32_ps(acc[x][sp])) };
                let c0 = h * 16 + sp * (d / planes);
                let row = &mut dst[x * d + c0..x * d + c0 + 16];
                for i in 0..16 {
                    row[i] = a[i].mul_add(wscale[x], row[i]);
                }
            }
        }
    }
    for x in 0..k {
        dst[x * d..(x + 1) * d]
            .iter_mut()
            .for_each(|v| *v += zsum[x]);
    }
}

/// Scores of four query rows (duplicates allowed) against a 2- or 4-bit page of 64 tokens
/// with per-token key groups, in integer arithmetic: channel pairs of the codes against the
/// queries' i16 pairs with `vpdpwssd` (exact i32 sums), then `s * scale_q * Σ + z * Σq` in
/// f32. `rows` are global query-row indices into `qi`.
// SAFETY: callers must run on a CPU with AVX-512 F/BW and VNNI (the VNNI build of run_item).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_vnni<const CAP: usize, const B: u8>(
    page: &Page,
    lay: &Layout,
    hp: &HeadParams<CAP>,
    kh: usize,
    d: usize,
    g: usize,
    qi: &QInt,
    rows: [usize; 4],
    out: &mut [[f32; CAP]],
) {
    use std::arch::x86_64::*;
    debug_assert!(CAP == 64 && (B == 2 || B == 4));
    let bytes = page.bytes();
    let base = lay.head(kh);
    let k_row = lay.k_row;
    let planes = 8 / B as usize;
    let per_plane = CAP / planes; // tokens per plane
    let chunks = k_row / 16;
    let mask = _mm512_set1_epi32(if B == 2 { 0x0003_0003 } else { 0x000F_000F });
    let ng = d / g;
    let hd = d / 2;
    for o in out.iter_mut() {
        *o = [0.0; CAP];
    }
    for gi in 0..ng {
        let mut acc = [[_mm512_setzero_si512(); 4]; 4];
        for c in (gi * g..(gi + 1) * g).step_by(2) {
            let qp: [__m512i; 4] =
                std::array::from_fn(|x| _mm512_set1_epi32(qi.pairs[rows[x] * hd + c / 2]));
            for h in 0..chunks {
                let o0 = base + c * k_row + h * 16;
                let w = pair16(bytes, o0, o0 + k_row);
                for sp in 0..planes {
                    let plane = _mm512_and_si512(
                        _mm512_srlv_epi32(w, _mm512_set1_epi32(sp as i32 * B as i32)),
                        mask,
                    );
                    let tb = h + sp * per_plane / 16;
                    for x in 0..4 {
                        acc[x][tb] = _mm512_dpwssd_epi32(acc[x][tb], plane, qp[x]);
                    }
                }
            }
        }
        let (s, z) = (&hp.s[gi], &hp.z[gi]);
        for (x, o) in out.iter_mut().enumerate() {
            let qs = qi.scale[rows[x]];
            let qsum = qi.gsum[rows[x] * ng + gi];
            let lost = qi.lost[rows[x] * ng + gi] * ((1u32 << B) - 1) as f32 * 0.5;
            for tb in 0..4 {
                let mut a = [0f32; 16];
                // SAFETY: `a` holds 16 f32.
                unsafe { _mm512_storeu_ps(a.as_mut_ptr(), _mm512_cvtepi32_ps(acc[x][tb])) };
                for j in 0..16 {
                    let t = tb * 16 + j;
                    o[t] = (s[t] * qs).mul_add(a[j], s[t].mul_add(lost, z[t].mul_add(qsum, o[t])));
                }
            }
        }
    }
}

/// Key scales and zeros of one head of a page, converted to f32 once per page.
struct HeadParams<const CAP: usize> {
    /// Per-token layout: `[D/g][CAP]`.
    s: Vec<[f32; CAP]>,
    z: Vec<[f32; CAP]>,
    /// Per-channel layout: `[D]`.
    cs: Vec<f32>,
    cz: Vec<f32>,
}

impl<const CAP: usize> HeadParams<CAP> {
    fn new(ng: usize, d: usize) -> Self {
        HeadParams {
            s: vec![[0.0; CAP]; ng],
            z: vec![[0.0; CAP]; ng],
            cs: vec![0.0; d],
            cz: vec![0.0; d],
        }
    }

    #[inline(always)]
    fn load(&mut self, m: &Meta, page: &Page, lay: &Layout, h: usize) {
        let base = lay.head(h);
        let d = m.d;
        if lay.per_channel {
            for (o, x) in self.cs.iter_mut().zip(page.u16s(base + lay.k_scale, d)) {
                *o = f16_to_f32(*x);
            }
            for (o, x) in self.cz.iter_mut().zip(page.u16s(base + lay.k_zero, d)) {
                *o = f16_to_f32(*x);
            }
        } else {
            let ng = d / m.group;
            let sc = page.u16s(base + lay.k_scale, ng * CAP);
            let zr = page.u16s(base + lay.k_zero, ng * CAP);
            for gi in 0..ng {
                let s16: &[u16; CAP] = sc[gi * CAP..(gi + 1) * CAP].try_into().expect("CAP scales");
                let z16: &[u16; CAP] = zr[gi * CAP..(gi + 1) * CAP].try_into().expect("CAP zeros");
                self.s[gi] = std::array::from_fn(|t| f16_to_f32(s16[t]));
                self.z[gi] = std::array::from_fn(|t| f16_to_f32(z16[t]));
            }
        }
    }
}

/// Dequantizes key channel `c` of head `h` of a page into `out` (all `CAP` slots).
#[inline(always)]
fn key_row<const FMA: bool, const CAP: usize, const B: u8>(
    m: &Meta,
    page: &Page,
    lay: &Layout,
    hp: &HeadParams<CAP>,
    h: usize,
    c: usize,
    out: &mut [f32; CAP],
) {
    let base = lay.head(h);
    if B == 16 {
        let src = page.u16s(base + c * CAP * 2, CAP);
        let fmt = m.cfg.fp_format;
        for (o, s) in out.iter_mut().zip(src) {
            *o = fmt.decode(*s);
        }
        return;
    }
    let off = base + c * lay.k_row;
    unpack_row_f32(&page.bytes()[off..off + lay.k_row], B, out);
    if lay.per_channel {
        affine_scalar::<FMA>(out, hp.cs[c], hp.cz[c]);
    } else {
        let gi = c / m.group;
        let (s, z) = (&hp.s[gi], &hp.z[gi]);
        for t in 0..CAP {
            out[t] = madd::<FMA>(out[t], s[t], z[t]);
        }
    }
}

/// Dequantizes the keys of head group `g` into `tile` (`[group_heads * D][CAP]`), row
/// `perm[j]` receiving stored channel `j` when a permutation is given.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn key_tile<const FMA: bool, const CAP: usize, const B: u8>(
    m: &Meta,
    page: &Page,
    lay: &Layout,
    hps: &[HeadParams<CAP>],
    g: usize,
    perm: Option<&[u32]>,
    tile: &mut [[f32; CAP]],
) {
    let d = m.d;
    let gh = hps.len();
    let gl = gh * d;
    if B < 16 && !lay.per_channel {
        // Per-token scales: one group's scale and zero rows stay in registers across its
        // channels instead of being reloaded per channel.
        let bytes = page.bytes();
        for (hh, hp) in hps.iter().enumerate() {
            let base = lay.head(g * gh + hh);
            for gi in 0..d / m.group {
                let (s, z) = (hp.s[gi], hp.z[gi]);
                for c in gi * m.group..(gi + 1) * m.group {
                    let j = hh * d + c;
                    let dst = perm.map_or(j, |p| p[g * gl + j] as usize);
                    let out = &mut tile[dst];
                    let off = base + c * lay.k_row;
                    unpack_row_f32(&bytes[off..off + lay.k_row], B, out);
                    for t in 0..CAP {
                        out[t] = madd::<FMA>(out[t], s[t], z[t]);
                    }
                }
            }
        }
        return;
    }
    for j in 0..gl {
        let dst = perm.map_or(j, |p| p[g * gl + j] as usize);
        let hh = j / d;
        key_row::<FMA, CAP, B>(m, page, lay, &hps[hh], g * gh + hh, j % d, &mut tile[dst]);
    }
}

/// Scores of up to four query rows against a quantized page's keys in the stored basis,
/// straight from the codes: with `k = s*code + z` per group,
/// `q·k = Σ_groups s * (q·code) + z * Σq` (per channel: `Σ (q*s)·code + Σ q*z`).
#[inline(always)]
fn scores_direct<const FMA: bool, const CAP: usize, const B: u8>(
    m: &Meta,
    page: &Page,
    lay: &Layout,
    hp: &HeadParams<CAP>,
    kh: usize,
    qs: &[&[f32]],
    out: &mut [[f32; CAP]],
) {
    let (d, g) = (m.d, m.group);
    let base = lay.head(kh);
    let bytes = page.bytes();
    let k = qs.len();
    let q4 = [qs[0], qs[1 % k], qs[2 % k], qs[3 % k]];
    let mut codes = [0f32; CAP];
    let mut acc = [[0f32; CAP]; 4];
    if lay.per_channel {
        let mut consts = [0f32; 4];
        for c in 0..d {
            let off = base + c * lay.k_row;
            unpack_row_f32(&bytes[off..off + lay.k_row], B, &mut codes);
            for x in 0..4 {
                let qc = q4[x][c] * hp.cs[c];
                consts[x] = madd::<FMA>(q4[x][c], hp.cz[c], consts[x]);
                for t in 0..CAP {
                    acc[x][t] = madd::<FMA>(qc, codes[t], acc[x][t]);
                }
            }
        }
        for x in 0..k {
            for t in 0..CAP {
                out[x][t] = acc[x][t] + consts[x];
            }
        }
        return;
    }
    for o in out.iter_mut().take(k) {
        *o = [0.0; CAP];
    }
    for gi in 0..d / g {
        acc = [[0f32; CAP]; 4];
        let mut qsum = [0f32; 4];
        for c in gi * g..(gi + 1) * g {
            let off = base + c * lay.k_row;
            unpack_row_f32(&bytes[off..off + lay.k_row], B, &mut codes);
            for x in 0..4 {
                let qc = q4[x][c];
                qsum[x] += qc;
                for t in 0..CAP {
                    acc[x][t] = madd::<FMA>(qc, codes[t], acc[x][t]);
                }
            }
        }
        let (s, z) = (&hp.s[gi], &hp.z[gi]);
        for x in 0..k {
            for t in 0..CAP {
                out[x][t] = madd::<FMA>(s[t], acc[x][t], madd::<FMA>(z[t], qsum[x], out[x][t]));
            }
        }
    }
}

/// Dequantizes value row (slot `u`) of head `h` into `out` (`D` channels).
#[inline(always)]
fn value_row<const FMA: bool, const B: u8>(
    m: &Meta,
    page: &Page,
    lay: &Layout,
    h: usize,
    u: usize,
    out: &mut [f32],
) {
    let base = lay.head(h);
    let d = m.d;
    if B == 16 {
        let src = page.u16s(base + lay.v_codes + u * d * 2, d);
        let fmt = m.cfg.fp_format;
        for (o, s) in out.iter_mut().zip(src) {
            *o = fmt.decode(*s);
        }
        return;
    }
    let off = base + lay.v_codes + u * lay.v_row;
    unpack_row_f32(&page.bytes()[off..off + lay.v_row], B, out);
    let ng = d / m.group;
    let s = page.u16s(base + lay.v_scale + u * ng * 2, ng);
    let z = page.u16s(base + lay.v_zero + u * ng * 2, ng);
    for (gi, grp) in out.chunks_exact_mut(m.group).enumerate() {
        affine_scalar::<FMA>(grp, f16_to_f32(s[gi]), f16_to_f32(z[gi]));
    }
}

/// Sets scores of slots that are dead or not visible to `-inf`.
#[inline(always)]
fn mask_row<const CAP: usize>(
    s: &mut [f32; CAP],
    pos: &[i32],
    start: usize,
    len: usize,
    lo: i32,
    hi: i32,
) {
    let pos = &pos[..CAP];
    for u in 0..CAP {
        let p = pos[u];
        let vis = (u >= start) & (u < len) & (p <= hi) & (p >= lo);
        s[u] = if vis { s[u] } else { f32::NEG_INFINITY };
    }
}

/// `rows[r][c0..c0+W] += Σ_u p[r][u] * vt[u][c0..c0+W]` for every row, 4 rows at a time.
#[inline(always)]
fn pv_block<const FMA: bool, const CAP: usize, const W: usize>(
    sc: &[[f32; CAP]],
    vt: &[f32],
    d: usize,
    c0: usize,
    start: usize,
    len: usize,
    rows: &mut [f32],
) {
    let nr = sc.len();
    let mut r = 0;
    while r < nr {
        let k = (nr - r).min(4);
        let p4 = [&sc[r], &sc[r + 1 % k], &sc[r + 2 % k], &sc[r + 3 % k]];
        let mut acc = [[0f32; W]; 4];
        for u in start..len {
            let v: &[f32; W] = vt[u * d + c0..u * d + c0 + W]
                .try_into()
                .expect("W channels");
            for x in 0..4 {
                let p = p4[x][u];
                for c in 0..W {
                    acc[x][c] = madd::<FMA>(p, v[c], acc[x][c]);
                }
            }
        }
        for x in 0..k {
            let dst = &mut rows[(r + x) * d + c0..(r + x) * d + c0 + W];
            for c in 0..W {
                dst[c] += acc[x][c];
            }
        }
        r += k;
    }
}

/// Scores of four query rows against a channel-major key tile (`[D][CAP]`).
#[inline(always)]
fn tile_scores<const FMA: bool, const CAP: usize>(
    tile: &[[f32; CAP]],
    q4: [&[f32]; 4],
) -> [[f32; CAP]; 4] {
    let d = tile.len();
    // Equal-length slices let LLVM drop the bounds checks, so the accumulators stay in
    // registers across the channel loop.
    let q4 = q4.map(|q| &q[..d]);
    let mut acc = [[0f32; CAP]; 4];
    for (c, row) in tile.iter().enumerate() {
        let qc = [q4[0][c], q4[1][c], q4[2][c], q4[3][c]];
        for x in 0..4 {
            for t in 0..CAP {
                acc[x][t] = madd::<FMA>(qc[x], row[t], acc[x][t]);
            }
        }
    }
    acc
}

/// [`tile_scores`] for pre-RoPE keys: rows `i` and `i + half` (`i < half`) of the
/// channel-major tile are rotated by RoPE (`cos`/`sin`: `[half][CAP]`, scaling included) in
/// registers on their way into the dot products, so the rotated tile is never stored; rows
/// past `2 * half` (partial rotary) pass through.
#[inline(always)]
fn tile_scores_rope<const FMA: bool, const CAP: usize>(
    tile: &[[f32; CAP]],
    cos: &[[f32; CAP]],
    sin: &[[f32; CAP]],
    q4: [&[f32]; 4],
) -> [[f32; CAP]; 4] {
    // 32 tokens at a time: 8 accumulators plus the rotated pair stay in registers.
    const W: usize = 32;
    let d = tile.len();
    let half = cos.len().min(sin.len()).min(d / 2);
    let q4 = q4.map(|q| &q[..d]);
    let mut out = [[0f32; CAP]; 4];
    for t0 in (0..CAP).step_by(W) {
        fn w<const CAP: usize, const W: usize>(row: &[f32; CAP], t0: usize) -> &[f32; W] {
            (&row[t0..t0 + W]).try_into().expect("W tokens")
        }
        let mut acc = [[0f32; W]; 4];
        for i in 0..half {
            let (a, b): (&[f32; W], &[f32; W]) = (w(&tile[i], t0), w(&tile[i + half], t0));
            let (c, s): (&[f32; W], &[f32; W]) = (w(&cos[i], t0), w(&sin[i], t0));
            let qa = [q4[0][i], q4[1][i], q4[2][i], q4[3][i]];
            let qb = [
                q4[0][i + half],
                q4[1][i + half],
                q4[2][i + half],
                q4[3][i + half],
            ];
            for t in 0..W {
                let ra = madd::<FMA>(a[t], c[t], -(b[t] * s[t]));
                let rb = madd::<FMA>(b[t], c[t], a[t] * s[t]);
                for x in 0..4 {
                    acc[x][t] = madd::<FMA>(qa[x], ra, madd::<FMA>(qb[x], rb, acc[x][t]));
                }
            }
        }
        for (c, row) in tile.iter().enumerate().skip(2 * half) {
            let r: &[f32; W] = w(row, t0);
            for x in 0..4 {
                let qc = q4[x][c];
                for t in 0..W {
                    acc[x][t] = madd::<FMA>(qc, r[t], acc[x][t]);
                }
            }
        }
        for x in 0..4 {
            out[x][t0..t0 + W].copy_from_slice(&acc[x]);
        }
    }
    out
}

/// Max and sum of a score row, in 16 lanes so that the reductions vectorize.
#[inline(always)]
fn row_max<const CAP: usize>(s: &[f32; CAP]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    for ch in s.chunks_exact(16) {
        for i in 0..16 {
            m[i] = m[i].max(ch[i]);
        }
    }
    m.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn exp_row<const CAP: usize>(s: &mut [f32; CAP], mx: f32) -> f32 {
    let mut acc = [0f32; 16];
    for ch in s.chunks_exact_mut(16) {
        for i in 0..16 {
            let p = exp_f32(ch[i] - mx);
            ch[i] = p;
            acc[i] += p;
        }
    }
    acc.iter().sum()
}

#[inline(always)]
fn run_tiles<const FMA: bool, const VNNI: bool, const CAP: usize>(ctx: &Ctx, it: &Item) -> Partial {
    let m = ctx.meta;
    let plan = &m.plan;
    let (d, hkv, hq, tq) = (m.d, m.heads, ctx.hq, ctx.tq);
    let gqa = hq / hkv;
    let gh = plan.group_heads;
    let gl = gh * d;
    let ng = hkv / gh;
    let ngrp = d / m.group;
    let rows = hq * it.tqn;
    let nr = gqa * it.tqn;
    let mut part = Partial::new(rows, d);
    let perm = &plan.key_perm[ctx.layer];
    let pre_rope = plan.mode == Mode::PreRope;
    let rope = m.rope.as_ref();
    let half = rope.map_or(0, |r| r.half());
    let mut tile = vec![[0f32; CAP]; gl];
    let mut cos = vec![[0f32; CAP]; half];
    let mut sin = vec![[0f32; CAP]; half];
    let mut scores = vec![[0f32; CAP]; gh * nr];
    let mut hps: Vec<HeadParams<CAP>> = (0..gh).map(|_| HeadParams::new(ngrp, d)).collect();
    let mut vt = vec![0f32; CAP * d];
    let qpos = &ctx.qpos[it.b * tq + it.tq0..it.b * tq + it.tq0 + it.tqn];
    let qmax = qpos.iter().copied().max().unwrap_or(0);
    let qmin = qpos.iter().copied().min().unwrap_or(0);
    let q_of = |src: &'_ [f32], kh: usize, r: usize| -> std::ops::Range<usize> {
        let (rep, t) = (r / it.tqn, r % it.tqn);
        let o = ((it.b * hq + kh * gqa + rep) * tq + it.tq0 + t) * d;
        let _ = src;
        o..o + d
    };
    for page in &ctx.pages[it.b][it.p0..it.p1] {
        if ctx.causal && page.min_pos > qmax {
            continue;
        }
        if let Some(w) = ctx.window {
            if (page.max_pos as i64) <= qmin as i64 - w as i64 {
                continue;
            }
        }
        let lay = m.layout(page.bits);
        let quant = page.bits < 16;
        let pos = page.positions();
        let mut rope_ready = false;
        let use_rot_q = quant && ctx.q_rot.is_some();
        let direct = use_rot_q && nr <= 8;
        for g in 0..ng {
            if quant {
                for (hh, hp) in hps.iter_mut().enumerate() {
                    hp.load(m, page, lay, g * gh + hh);
                }
            }
            // 1. Scores of every row of the group's heads.
            if direct {
                let qsrc = ctx.q_rot.as_deref().expect("rotated queries");
                let kh = g;
                let mut r = 0;
                while r < nr {
                    let k = (nr - r).min(4);
                    #[cfg(target_arch = "x86_64")]
                    if VNNI && CAP == 64 && !lay.per_channel && (page.bits == 2 || page.bits == 4) {
                        let qi = ctx.q_int.as_ref().expect("integer queries");
                        let rows: [usize; 4] =
                            std::array::from_fn(|x| q_of(qsrc, kh, r + x % k).start / d);
                        let hp = &hps[0];
                        let out = &mut scores[r..r + k];
                        // SAFETY: VNNI is true only in the AVX-512 build of run_item, which runs
                        // only when the CPU has AVX-512 F/BW and VNNI.
                        unsafe {
                            if page.bits == 2 {
                                scores_vnni::<CAP, 2>(page, lay, hp, kh, d, m.group, qi, rows, out);
                            } else {
                                scores_vnni::<CAP, 4>(page, lay, hp, kh, d, m.group, qi, rows, out);
                            }
                        }
                        r += k;
                        continue;
                    }
                    let qs: Vec<&[f32]> = (r..r + k).map(|x| &qsrc[q_of(qsrc, kh, x)]).collect();
                    let out = &mut scores[r..r + k];
                    let hp = &hps[0];
                    match page.bits {
                        2 => scores_direct::<FMA, CAP, 2>(m, page, lay, hp, kh, &qs, out),
                        3 => scores_direct::<FMA, CAP, 3>(m, page, lay, hp, kh, &qs, out),
                        4 => scores_direct::<FMA, CAP, 4>(m, page, lay, hp, kh, &qs, out),
                        _ => scores_direct::<FMA, CAP, 8>(m, page, lay, hp, kh, &qs, out),
                    }
                    r += k;
                }
            } else {
                if pre_rope && !rope_ready {
                    let r = rope.expect("pre_rope store has RoPE");
                    // Locals only, so that LLVM sees no aliasing and vectorizes over tokens.
                    let scaling = r.scaling;
                    let pf: [f32; CAP] = std::array::from_fn(|t| pos[t] as f32);
                    for i in 0..half {
                        let f = r.inv_freq[i];
                        let mut cc = [0f32; CAP];
                        let mut ss = [0f32; CAP];
                        for t in 0..CAP {
                            let (c, s) = sincos_f32_angle(pf[t] * f);
                            cc[t] = c * scaling;
                            ss[t] = s * scaling;
                        }
                        cos[i] = cc;
                        sin[i] = ss;
                    }
                    rope_ready = true;
                }
                let pm = if quant && !use_rot_q {
                    Some(&perm[..])
                } else {
                    None
                };
                match page.bits {
                    2 => key_tile::<FMA, CAP, 2>(m, page, lay, &hps, g, pm, &mut tile),
                    3 => key_tile::<FMA, CAP, 3>(m, page, lay, &hps, g, pm, &mut tile),
                    4 => key_tile::<FMA, CAP, 4>(m, page, lay, &hps, g, pm, &mut tile),
                    8 => key_tile::<FMA, CAP, 8>(m, page, lay, &hps, g, pm, &mut tile),
                    _ => key_tile::<FMA, CAP, 16>(m, page, lay, &hps, g, pm, &mut tile),
                }
                // The transform runs unnormalized; its 1/sqrt(n) scales the scores instead,
                // which saves a pass over the tile.
                let mut kscale = 1.0f32;
                if quant && !use_rot_q {
                    if let Some(h) = &m.had_k {
                        cols_raw_body(h, tile.as_flattened_mut(), CAP, true);
                        kscale = h.norm();
                    }
                }
                let rope_rows = pre_rope && !use_rot_q;
                let qsrc: &[f32] = if use_rot_q {
                    ctx.q_rot.as_deref().expect("rotated queries")
                } else {
                    &ctx.q
                };
                for hh in 0..gh {
                    let kh = g * gh + hh;
                    let mut r = 0;
                    while r < nr {
                        let k = (nr - r).min(4);
                        let q4: [&[f32]; 4] =
                            std::array::from_fn(|x| &qsrc[q_of(qsrc, kh, r + x % k)]);
                        let kt = &tile[hh * d..(hh + 1) * d];
                        let mut acc = if rope_rows {
                            tile_scores_rope::<FMA, CAP>(kt, &cos, &sin, q4)
                        } else {
                            tile_scores::<FMA, CAP>(kt, q4)
                        };
                        if kscale != 1.0 {
                            acc.iter_mut().flatten().for_each(|x| *x *= kscale);
                        }
                        scores[hh * nr + r..hh * nr + r + k].copy_from_slice(&acc[..k]);
                        r += k;
                    }
                }
            }
            // 2. Mask, soft-cap, online softmax.
            let mut any = false;
            for hh in 0..gh {
                let kh = g * gh + hh;
                for r in 0..nr {
                    let t = r % it.tqn;
                    let prow = kh * nr + r;
                    let qp = qpos[t];
                    let hi = if ctx.causal { qp } else { i32::MAX };
                    let lo = match ctx.window {
                        Some(w) => (qp as i64 - w as i64 + 1).max(i32::MIN as i64) as i32,
                        None => i32::MIN,
                    };
                    let s = &mut scores[hh * nr + r];
                    if let Some(cap) = ctx.softcap {
                        for v in s.iter_mut() {
                            *v = cap * (*v / cap).tanh();
                        }
                    }
                    mask_row(s, pos, page.start, page.len, lo, hi);
                    let mx = row_max(s);
                    if mx == f32::NEG_INFINITY {
                        *s = [0.0; CAP];
                        continue;
                    }
                    any = true;
                    let mold = part.m[prow];
                    let mnew = mold.max(mx);
                    if mnew > mold {
                        let corr = exp_f32(mold - mnew);
                        part.l[prow] *= corr;
                        part.plain[prow * d..(prow + 1) * d]
                            .iter_mut()
                            .for_each(|x| *x *= corr);
                        part.rot[prow * d..(prow + 1) * d]
                            .iter_mut()
                            .for_each(|x| *x *= corr);
                        part.m[prow] = mnew;
                    }
                    part.l[prow] += exp_row(s, mnew);
                }
            }
            if !any {
                continue;
            }
            // 3. Values: the page's value rows are dequantized once into a token-major tile
            // shared by every query row; the weighted sum keeps blocks of 4 rows x 64
            // channels in registers across the page's tokens.
            let acc = if quant && m.had_v.is_some() {
                &mut part.rot
            } else {
                &mut part.plain
            };
            for hh in 0..gh {
                let kh = g * gh + hh;
                #[cfg(target_arch = "x86_64")]
                if VNNI
                    && CAP == 64
                    && (page.bits == 2 || page.bits == 4)
                    && m.group == d
                    && lay.v_row.is_multiple_of(16)
                {
                    let sc = &scores[hh * nr..(hh + 1) * nr];
                    let rows = &mut acc[kh * nr * d..(kh + 1) * nr * d];
                    let mut r = 0;
                    while r < nr {
                        let k = (nr - r).min(4);
                        let p4 = [&sc[r], &sc[r + 1 % k], &sc[r + 2 % k], &sc[r + 3 % k]];
                        let dst = &mut rows[r * d..(r + k) * d];
                        // SAFETY: VNNI is true only in the AVX-512 build of run_item, which
                        // runs only when the CPU has AVX-512 F/BW and VNNI.
                        unsafe {
                            if page.bits == 2 {
                                pv_vnni::<CAP, 2>(page, lay, kh, d, p4, k, dst);
                            } else {
                                pv_vnni::<CAP, 4>(page, lay, kh, d, p4, k, dst);
                            }
                        }
                        r += k;
                    }
                    continue;
                }
                for u in page.start..page.len {
                    let row = &mut vt[u * d..(u + 1) * d];
                    match page.bits {
                        2 => value_row::<FMA, 2>(m, page, lay, kh, u, row),
                        3 => value_row::<FMA, 3>(m, page, lay, kh, u, row),
                        4 => value_row::<FMA, 4>(m, page, lay, kh, u, row),
                        8 => value_row::<FMA, 8>(m, page, lay, kh, u, row),
                        _ => value_row::<FMA, 16>(m, page, lay, kh, u, row),
                    }
                }
                let sc = &scores[hh * nr..(hh + 1) * nr];
                let rows = &mut acc[kh * nr * d..(kh + 1) * nr * d];
                let mut c0 = 0;
                while c0 + 64 <= d {
                    pv_block::<FMA, CAP, 64>(sc, &vt, d, c0, page.start, page.len, rows);
                    c0 += 64;
                }
                while c0 < d {
                    pv_block::<FMA, CAP, 8>(sc, &vt, d, c0, page.start, page.len, rows);
                    c0 += 8;
                }
            }
        }
    }
    part
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f32;
        for i in 0..100_000 {
            let x = -90.0 + i as f32 * 0.00095;
            let want = x.exp();
            let got = exp_f32(x);
            if x < -87.0 {
                assert_eq!(got, 0.0);
                continue;
            }
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "{worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
