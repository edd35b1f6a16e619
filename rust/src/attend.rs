//! Fused attention over packed blocks (CPU): the one attention kernel of the CPU backend.
//!
//! Blocks arrive as [`PageView`] descriptors, per request, so the store's own pages and a
//! caller-owned pool read through a block table ([`crate::paged`]) run the same code.
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
//! Work is split over requests, query blocks and page ranges (split-K); partial softmax
//! states are merged exactly.

// Kernels index several arrays with one counter; iterator chains would hide that from
// LLVM's vectorizer and from the reader.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::config::Meta;
use crate::error::{Error, Result};
use crate::format::Layout;
use crate::hadamard::cols_raw_body;
use crate::page::PageView;
use crate::quant::{affine_scalar, unpack_row_f32};
use crate::rope::sincos_f32_angle;
use crate::rotation::Mode;
use crate::simd::{f16_to_f32, madd, Level};
use crate::tensor::{OutData, View4};

/// What a store's attention takes besides the layer and the output.
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
    /// only the older ones here and merges the two with the log-sum-exp.
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
    /// The options part.
    pub fn options(&self) -> Options<'_> {
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

/// Scale, window (about the lag-shifted positions) and lag of checked options.
#[derive(Clone, Copy, Debug)]
pub struct Masking {
    /// Score scale.
    pub scale: f32,
    /// The window about the shifted positions.
    pub window: Option<usize>,
    /// Query positions are shifted down by this much.
    pub lag: usize,
}

/// Checks the options every attention call shares (one place for both backends, the store
/// and the pools). `d` is the head dim.
pub fn check_options(o: &Options, d: usize) -> Result<Masking> {
    let scale = o.scale.unwrap_or(1.0 / (d as f32).sqrt());
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::value(
            "scale",
            "a finite value > 0",
            scale.to_string(),
        ));
    }
    if let Some(c) = o.softcap {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::value("softcap", "a finite value > 0", c.to_string()));
        }
    }
    if o.window == Some(0) {
        return Err(Error::value("window", ">= 1", "0"));
    }
    if o.lag > 0 && !o.causal {
        return Err(Error::value(
            "lag",
            "0 without causal masking",
            o.lag.to_string(),
        ));
    }
    if o.lag > i32::MAX as usize || o.window.is_some_and(|w| w <= o.lag) {
        return Err(Error::value(
            "lag",
            format!(
                "less than the window ({})",
                o.window.unwrap_or(i32::MAX as usize)
            ),
            o.lag.to_string(),
        ));
    }
    // Masks are all the kernels use query positions for (queries arrive with RoPE applied),
    // so a lag is a shift of the query positions; the window shrinks by as much to keep
    // `q_pos - k_pos < window` about the true position.
    Ok(Masking {
        scale,
        window: o.window.map(|w| w - o.lag),
        lag: o.lag,
    })
}

/// Keys and values read row by row beside the packed pages: the 16-bit recent window a
/// serving engine keeps outside its pool (side rows, and the step's own rows).
///
/// Flat query row `i` at position `p` of request `b` has `r` window columns: column `j` is
/// the key at position `p - r + 1 + j`, read from row `idx[i * r + j]` of the two sources
/// (rows `0..N0` are the first's, `N0..N0 + N1` the second's; `-1`: not held). Only the
/// request's newest `lag[b]` positions come from here (columns `j >= r - lag[b]`); its
/// packed pages serve the keys at positions `<= p - lag[b]`, so every key counts once.
#[derive(Clone, Copy, Debug)]
pub struct Recent<'a> {
    /// Keys of the two sources, `[1, N_s, H, D]` each.
    pub k: [View4<'a>; 2],
    /// Values, shaped as the keys.
    pub v: [View4<'a>; 2],
    /// `[rows, r]` row indices (`-1`: none).
    pub idx: &'a [i64],
    /// Window columns per query.
    pub r: usize,
    /// Per request: the newest positions read from here instead of the pages (`0..=r`).
    pub lag: &'a [i64],
}

impl Recent<'_> {
    /// Checks the sources against `H` KV heads of `D` channels, `rows` query rows and `b`
    /// requests (the one place these rules live).
    pub fn check(&self, heads: usize, d: usize, rows: usize, b: usize) -> Result<()> {
        let names = [("recent_k", "recent_v"), ("step_k", "step_v")];
        for s in 0..2 {
            let (k, v) = (self.k[s].shape, self.v[s].shape);
            let (kn, vn) = names[s];
            if k[0] != 1 || k[2] != heads || k[3] != d {
                return Err(Error::shape(
                    kn,
                    format!("[rows, {heads}, {d}]"),
                    format!("{:?}", &k[1..]),
                ));
            }
            if v != k {
                return Err(Error::shape(
                    vn,
                    format!("{kn}'s shape {:?}", &k[1..]),
                    format!("{:?}", &v[1..]),
                ));
            }
        }
        if self.r == 0 || self.idx.len() != rows * self.r {
            return Err(Error::shape(
                "recent_idx",
                format!("[Tq = {rows}, R >= 1]"),
                format!("{} elements", self.idx.len()),
            ));
        }
        let n = (self.k[0].shape[1] + self.k[1].shape[1]) as i64;
        if let Some(e) = self.idx.iter().find(|&&e| !(-1..n).contains(&e)) {
            return Err(Error::value(
                "recent_idx",
                format!("-1 or a row in 0..{n} (recent_k's rows, then step_k's)"),
                e.to_string(),
            ));
        }
        if self.lag.len() != b {
            return Err(Error::shape(
                "recent_lag",
                format!("[B = {b}]"),
                format!("{} elements", self.lag.len()),
            ));
        }
        if let Some(l) = self
            .lag
            .iter()
            .find(|&&l| !(0..=self.r as i64).contains(&l))
        {
            return Err(Error::value(
                "recent_lag",
                format!("0..={} (the window columns)", self.r),
                l.to_string(),
            ));
        }
        Ok(())
    }
}

/// Where each request's queries sit: request `b` has `tq[b]` query rows per head, the
/// rows `q0[b] .. q0[b] + tq[b]` of the flat query order.
#[derive(Clone, Debug)]
pub struct Queries {
    /// First flat query row of each request.
    pub q0: Vec<usize>,
    /// Query rows of each request.
    pub tq: Vec<usize>,
    /// Query heads.
    pub hq: usize,
    /// Outputs (and log-sum-exps) are token-major `[Tq_total, Hq]` rows (a pool's ragged
    /// batch) instead of `[B, Hq, Tq]` (the store's).
    pub token_major: bool,
}

impl Queries {
    /// `B` requests of `tq` queries each.
    pub fn uniform(b: usize, hq: usize, tq: usize) -> Self {
        Queries {
            q0: (0..b).map(|i| i * tq).collect(),
            tq: vec![tq; b],
            hq,
            token_major: false,
        }
    }
    /// Query rows of every request, per head.
    pub fn total(&self) -> usize {
        self.tq.iter().sum()
    }
    /// Row of query `t` of head `h` of request `b` in the kernel's dense queries
    /// (`[request][Hq][Tq_b]`).
    #[inline(always)]
    fn dense(&self, b: usize, h: usize, t: usize) -> usize {
        self.q0[b] * self.hq + h * self.tq[b] + t
    }
    /// Row of query `t` of head `h` of request `b` in the output.
    #[inline(always)]
    pub fn out_row(&self, b: usize, h: usize, t: usize) -> usize {
        if self.token_major {
            (self.q0[b] + t) * self.hq + h
        } else {
            self.dense(b, h, t)
        }
    }
}

/// One attention call over page views, as the store and the pools hand it to the kernel.
pub struct Job<'a> {
    /// Shapes, plan, RoPE and transforms.
    pub meta: &'a Meta,
    /// Layer (selects the plan's permutation).
    pub layer: usize,
    /// Live pages of each request, in order.
    pub pages: Vec<Vec<PageView<'a>>>,
    /// Query layout.
    pub rows: Queries,
    /// Query positions by flat query row (before the lag shift).
    pub qpos: Vec<i32>,
    /// Mask keys after the query.
    pub causal: bool,
    /// Soft cap.
    pub softcap: Option<f32>,
    /// Checked scale, window and lag.
    pub masking: Masking,
    /// Rows read beside the pages (needs `causal` and no `masking.lag`).
    pub recent: Option<Recent<'a>>,
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

/// One unit of parallel work: a request, a block of its queries, a range of its pages.
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
    pages: &'a [Vec<PageView<'a>>],
    rows: &'a Queries,
    /// Dense `[request][Hq][Tq_b][D]`, scaled.
    q: Vec<f32>,
    /// Rotated queries for quantized pages (fast path), same shape.
    q_rot: Option<Vec<f32>>,
    /// Rotated queries rounded to i16 pairs, for the VNNI path.
    q_int: Option<QInt>,
    /// By flat query row: the position, the last and first key positions the pages may
    /// serve (lags and sliding window applied).
    qpos: Vec<i32>,
    qhi: Vec<i32>,
    qlo: Vec<i32>,
    /// The sliding window about the true positions.
    window: Option<usize>,
    softcap: Option<f32>,
    recent: Option<Recent<'a>>,
}

/// Reads the queries of a job into the kernel's dense, scaled order: `read(b, h, t, row)`
/// fills one row. Non-finite queries are refused (they would poison the softmax silently).
pub fn dense_queries(
    rows: &Queries,
    d: usize,
    scale: f32,
    mut read: impl FnMut(usize, usize, usize, &mut [f32]),
) -> Result<Vec<f32>> {
    let mut q = vec![0f32; rows.total() * rows.hq * d];
    for b in 0..rows.tq.len() {
        for h in 0..rows.hq {
            for t in 0..rows.tq[b] {
                let o = rows.dense(b, h, t) * d;
                read(b, h, t, &mut q[o..o + d]);
                q[o..o + d].iter_mut().for_each(|x| *x *= scale);
            }
        }
    }
    if let Some(x) = q.iter().find(|x| !x.is_finite()) {
        return Err(Error::value("q", "finite values", x.to_string()));
    }
    Ok(q)
}

/// Runs a job: writes every query row's output (`rows.total() * Hq` rows of `D`) into `out`
/// and, when given, its log-sum-exp of the scaled (and capped) scores into `lse` (`-inf`
/// for a row that sees no key, whose output is 0), so that attention over disjoint key sets
/// can be merged exactly. `q` comes from [`dense_queries`].
pub fn run(
    level: Level,
    job: &Job,
    q: Vec<f32>,
    out: &mut OutData,
    mut lse: Option<&mut [f32]>,
) -> Result<()> {
    let m = job.meta;
    let d = m.d;
    let rows = &job.rows;
    let hq = rows.hq;
    let n_rows = rows.total() * hq;
    if out.len() != n_rows * d {
        return Err(Error::shape(
            "out",
            format!("{} elements", n_rows * d),
            out.len().to_string(),
        ));
    }
    if let Some(l) = &lse {
        if l.len() != n_rows {
            return Err(Error::shape(
                "lse",
                format!("{n_rows} elements"),
                l.len().to_string(),
            ));
        }
    }
    if n_rows == 0 {
        return Ok(());
    }
    let layer = job.layer;
    let plan = &m.plan;
    let fast = plan.mode != Mode::PreRope && plan.group_heads == 1;
    let q_rot = fast.then(|| {
        let gqa = hq / m.heads;
        let mut qr = q.clone();
        let perm = &plan.key_perm[layer];
        let mut y = vec![0f32; d];
        // Dense rows are [request][Hq][Tq_b]: walk them by request to know each row's head.
        let mut r = 0;
        for b in 0..rows.tq.len() {
            for h in 0..hq {
                let kh = h / gqa;
                for _ in 0..rows.tq[b] {
                    let row = &mut qr[r * d..(r + 1) * d];
                    y.copy_from_slice(row);
                    if let Some(hk) = &m.had_k {
                        hk.forward(&mut y);
                    }
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = y[perm[kh * d + j] as usize];
                    }
                    r += 1;
                }
            }
        }
        qr
    });
    let q_int = q_rot.as_ref().map(|qr| QInt::new(qr, d, m.group));
    let window = job.masking.window.map(|w| w + job.masking.lag);
    let mut lag = vec![job.masking.lag as i32; job.qpos.len()];
    if let Some(rc) = &job.recent {
        if !job.causal || job.masking.lag > 0 {
            return Err(Error::value(
                "causal",
                "causal masking and no lag with recent rows",
                format!("causal={}, lag={}", job.causal, job.masking.lag),
            ));
        }
        rc.check(m.heads, d, job.qpos.len(), rows.tq.len())?;
        for b in 0..rows.tq.len() {
            lag[rows.q0[b]..rows.q0[b] + rows.tq[b]].fill(rc.lag[b] as i32);
        }
    }
    let qhi = (job.qpos.iter().zip(&lag))
        .map(|(p, l)| if job.causal { p - l } else { i32::MAX })
        .collect();
    let qlo = job
        .qpos
        .iter()
        .map(|&p| {
            window.map_or(i32::MIN, |w| {
                (p as i64 - w as i64 + 1).max(i32::MIN as i64) as i32
            })
        })
        .collect();
    let ctx = Ctx {
        meta: m,
        layer,
        pages: &job.pages,
        rows,
        q,
        q_rot,
        q_int,
        qpos: job.qpos.clone(),
        qhi,
        qlo,
        window,
        softcap: job.softcap,
        recent: job.recent,
    };
    // Query blocks keep an item's rows (Hq * block) around 256; page ranges split the rest.
    let threads = rayon::current_num_threads().max(1);
    let nb = rows.tq.len();
    let mut items = Vec::new();
    for bi in 0..nb {
        let tq = rows.tq[bi];
        if tq == 0 {
            continue;
        }
        let tqb = (256 / hq).clamp(1, tq);
        let nqb = tq.div_ceil(tqb);
        let np = ctx.pages[bi].len();
        let want = (4 * threads).div_ceil(nb * nqb);
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
    // Merge the splits of each (request, query block) and finish the rows.
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
                let at = rows.out_row(it.b, h, it.tq0 + t);
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
    page: &PageView,
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
    let bytes = page.bytes;
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
    page: &PageView,
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
    let bytes = page.bytes;
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
    fn load(&mut self, m: &Meta, page: &PageView, lay: &Layout, h: usize) {
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
    page: &PageView,
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
    unpack_row_f32(&page.bytes[off..off + lay.k_row], B, out);
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
    page: &PageView,
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
        let bytes = page.bytes;
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
    page: &PageView,
    lay: &Layout,
    hp: &HeadParams<CAP>,
    kh: usize,
    qs: &[&[f32]],
    out: &mut [[f32; CAP]],
) {
    let (d, g) = (m.d, m.group);
    let base = lay.head(kh);
    let bytes = page.bytes;
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
    page: &PageView,
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
    unpack_row_f32(&page.bytes[off..off + lay.v_row], B, out);
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
    let (d, hkv, hq) = (m.d, m.heads, ctx.rows.hq);
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
    let q0 = ctx.rows.q0[it.b] + it.tq0;
    let qhi = &ctx.qhi[q0..q0 + it.tqn];
    let qlo = &ctx.qlo[q0..q0 + it.tqn];
    let qmax = qhi.iter().copied().max().unwrap_or(0);
    let qmin = qlo.iter().copied().min().unwrap_or(0);
    let q_of = |src: &'_ [f32], kh: usize, r: usize| -> std::ops::Range<usize> {
        let (rep, t) = (r / it.tqn, r % it.tqn);
        let o = ctx.rows.dense(it.b, kh * gqa + rep, it.tq0 + t) * d;
        let _ = src;
        o..o + d
    };
    for page in &ctx.pages[it.b][it.p0..it.p1] {
        if page.min_pos > qmax || page.max_pos < qmin {
            continue;
        }
        let lay = page.lay;
        // Keys `bits` wide, values `vbits` (equal but in asymmetric block formats).
        let (bits, vbits) = (lay.bits, lay.vbits);
        let quant = bits < 16;
        let pos: [i32; CAP] = page.pos.all::<CAP>();
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
                    if VNNI && CAP == 64 && !lay.per_channel && (bits == 2 || bits == 4) {
                        let qi = ctx.q_int.as_ref().expect("integer queries");
                        let rows: [usize; 4] =
                            std::array::from_fn(|x| q_of(qsrc, kh, r + x % k).start / d);
                        let hp = &hps[0];
                        let out = &mut scores[r..r + k];
                        // SAFETY: VNNI is true only in the AVX-512 build of run_item, which runs
                        // only when the CPU has AVX-512 F/BW and VNNI.
                        unsafe {
                            if bits == 2 {
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
                    match bits {
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
                match bits {
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
                    let (hi, lo) = (qhi[t], qlo[t]);
                    let s = &mut scores[hh * nr + r];
                    if let Some(cap) = ctx.softcap {
                        for v in s.iter_mut() {
                            *v = cap * (*v / cap).tanh();
                        }
                    }
                    mask_row(s, &pos, page.start, page.len, lo, hi);
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
                    && (vbits == 2 || vbits == 4)
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
                            if vbits == 2 {
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
                    match vbits {
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
    // The recent rows join the first page range's state (every query block has one).
    if it.p0 == 0 {
        if let Some(rc) = &ctx.recent {
            recent_rows::<FMA>(ctx, rc, it, &mut part);
        }
    }
    part
}

/// `Σ a[c] * b[c]` in 16 lanes, so that it vectorizes.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] = madd::<FMA>(x[i], y[i], acc[i]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ar.iter().zip(br) {
        tail = madd::<FMA>(*x, *y, tail);
    }
    acc.iter().sum::<f32>() + tail
}

/// Adds an item's recent rows (see [`Recent`]) to its softmax state: per query token and
/// KV head the held rows are read once into f32 tiles and scored by every query head of the
/// group; values are summed in the model's basis (`plain`), as the rows are stored.
/// Inlined into [`run_tiles`] so that it is compiled for the caller's SIMD level.
#[inline(always)]
fn recent_rows<const FMA: bool>(ctx: &Ctx, rc: &Recent, it: &Item, part: &mut Partial) {
    let m = ctx.meta;
    let (d, hkv, hq) = (m.d, m.heads, ctx.rows.hq);
    let gqa = hq / hkv;
    let r = rc.r;
    let n0 = rc.k[0].shape[1];
    let lag = rc.lag[it.b] as usize;
    let mut kt = vec![0f32; r * d];
    let mut vt = vec![0f32; r * d];
    let mut s = vec![0f32; r];
    let mut cols = Vec::with_capacity(r);
    for t in 0..it.tqn {
        let row = ctx.rows.q0[it.b] + it.tq0 + t;
        let p = ctx.qpos[row] as i64;
        cols.clear();
        for j in r - lag..r {
            let back = r - 1 - j; // the key is `back` positions before the query
            let e = rc.idx[row * r + j];
            if e >= 0 && p >= back as i64 && ctx.window.is_none_or(|w| back < w) {
                cols.push(e as usize);
            }
        }
        if cols.is_empty() {
            continue;
        }
        let n = cols.len();
        for kh in 0..hkv {
            for (u, &e) in cols.iter().enumerate() {
                let (src, i) = if e < n0 { (0, e) } else { (1, e - n0) };
                rc.k[src].read_row(0, i, kh, &mut kt[u * d..(u + 1) * d]);
                rc.v[src].read_row(0, i, kh, &mut vt[u * d..(u + 1) * d]);
            }
            for rep in 0..gqa {
                let h = kh * gqa + rep;
                let qo = ctx.rows.dense(it.b, h, it.tq0 + t) * d;
                let q = &ctx.q[qo..qo + d];
                let mut mx = f32::NEG_INFINITY;
                for u in 0..n {
                    let mut x = dot::<FMA>(q, &kt[u * d..(u + 1) * d]);
                    if let Some(cap) = ctx.softcap {
                        x = cap * (x / cap).tanh();
                    }
                    s[u] = x;
                    mx = mx.max(x);
                }
                let prow = h * it.tqn + t;
                let mold = part.m[prow];
                let mnew = mold.max(mx);
                let acc = &mut part.plain[prow * d..(prow + 1) * d];
                if mnew > mold {
                    let corr = exp_f32(mold - mnew);
                    part.l[prow] *= corr;
                    acc.iter_mut().for_each(|x| *x *= corr);
                    part.rot[prow * d..(prow + 1) * d]
                        .iter_mut()
                        .for_each(|x| *x *= corr);
                    part.m[prow] = mnew;
                }
                for u in 0..n {
                    let pu = exp_f32(s[u] - mnew);
                    part.l[prow] += pu;
                    let v = &vt[u * d..(u + 1) * d];
                    for c in 0..d {
                        acc[c] = madd::<FMA>(pu, v[c], acc[c]);
                    }
                }
            }
        }
    }
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
