//! Caller-owned pools: blocks of one [`BlockFormat`] in memory someone else allocated (a
//! serving engine's KV pool, a torch tensor), written through a slot mapping and read
//! through block tables, the way vLLM, SGLang and FlashInfer hand memory to kernels.
//!
//! A pool is `num_blocks` blocks of [`BlockFormat::block_bytes`] each, back to back; a
//! block holds `block_size` tokens of every KV head of one layer ([`crate::format`]
//! documents its bytes). A block holds no positions or tags: token `j` of a request sits at
//! slot `block_table[j / block_size] * block_size + j % block_size` and has position `j`.
//! Blocks may be shared between requests (prefix caching): [`write`] touches only the slots
//! it is given, and one block is written by one thread, so codes of neighbouring slots that
//! share a byte are never clobbered.
//!
//! Attention runs the store's kernel ([`crate::attend`]) over [`PageView`]s of the blocks;
//! pools in device memory run the store's CUDA kernels ([`crate::cuda::launch`]), which read
//! the slot mapping and block tables on the device.

use std::collections::BTreeMap;

use rayon::prelude::*;

use std::sync::Arc;

use crate::attend::{self, Job, Masking, Options, Queries, Recent};
use crate::config::{KeyLayout, Meta, QuantConfig};
use crate::cuda::abi::RkvLayout;
use crate::cuda::backend::Backend;
use crate::cuda::launch::{self, AttendIo, KvSource, PoolRef, PoolTables, PoolWrite};
use crate::device::DevTensor;
use crate::error::{Error, Result};
use crate::format::{check_bits, FpFormat, Layout};
use crate::page::{write_fp, write_quant_per_token, Chunk, PageView, Positions};
use crate::rope::Rope;
use crate::rotation::{Mode, RotationPlan};
use crate::simd::Level;
use crate::tensor::{OutData, View4};

/// The format of a pool's blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockFormat {
    /// KV heads.
    pub heads: usize,
    /// Head dim.
    pub d: usize,
    /// Bits per key code (16: unquantized).
    pub bits: u8,
    /// Bits per value code (16 only with 16-bit keys).
    pub value_bits: u8,
    /// Tokens per block (32 or 64).
    pub block_size: usize,
    /// Channels per quantization group.
    pub group: usize,
    /// Format of 16-bit blocks.
    pub fp_format: FpFormat,
    /// The block layout.
    pub layout: Layout,
}

impl BlockFormat {
    /// Checks and builds a format: keys `bits` wide, values `value_bits` (serving users'
    /// `k4v2`: keys usually need more). `group_size = None`: the head dim.
    pub fn new(
        heads: usize,
        d: usize,
        bits: u8,
        value_bits: u8,
        block_size: usize,
        group_size: Option<usize>,
        fp_format: FpFormat,
    ) -> Result<Self> {
        // Named as the caller names them; the pairing rule (16 only with 16) is the store's,
        // in `Meta::for_blocks`.
        check_bits("key_bits", bits)?;
        check_bits("value_bits", value_bits)?;
        if block_size != 32 && block_size != 64 {
            return Err(Error::value(
                "block_size",
                "32 or 64",
                block_size.to_string(),
            ));
        }
        // The rules of heads, head dim and group are a store's, checked in one place.
        crate::config::check_dims(heads, d)?;
        let plan = RotationPlan::identity(1, heads, d)?;
        let m = Meta::for_blocks(
            heads,
            d,
            Self::config(bits, value_bits, block_size, group_size, fp_format),
            plan,
            None,
        )?;
        Ok(BlockFormat {
            heads,
            d,
            bits,
            value_bits,
            block_size,
            group: m.group,
            fp_format,
            layout: m.layout(bits).clone(),
        })
    }

    fn config(
        bits: u8,
        value_bits: u8,
        block_size: usize,
        group: Option<usize>,
        fp: FpFormat,
    ) -> QuantConfig {
        QuantConfig {
            bits,
            value_bits: Some(value_bits),
            group_size: group,
            key_clip: None,
            value_clip: None,
            residual: 0,
            key_layout: KeyLayout::PerToken,
            page_tokens: Some(block_size),
            fp_format: fp,
        }
    }

    /// Bytes of one block (`block_size` tokens, every KV head).
    pub fn block_bytes(&self) -> usize {
        self.layout.total
    }

    /// Stored bits per key or value element: codes, scales and zeros (and alignment
    /// padding), nothing else.
    pub fn bits_per_element(&self) -> f64 {
        (self.block_bytes() * 8) as f64 / (self.block_size * self.heads * self.d * 2) as f64
    }

    /// The kernels' description of layer `layer` of `plan` over these blocks (a one-layer
    /// description: its layer 0 is `layer`). `rope` is required by `pre_rope` plans.
    pub fn meta(&self, plan: &RotationPlan, layer: usize, rope: Option<Rope>) -> Result<Meta> {
        if (plan.num_kv_heads, plan.head_dim) != (self.heads, self.d) {
            return Err(Error::value(
                "plan",
                format!("a plan for {} KV heads x {} channels", self.heads, self.d),
                format!(
                    "{} KV heads x {} channels",
                    plan.num_kv_heads, plan.head_dim
                ),
            ));
        }
        if layer >= plan.num_layers {
            return Err(Error::value(
                "layer",
                format!("0 <= layer < {}", plan.num_layers),
                layer.to_string(),
            ));
        }
        let cfg = Self::config(
            self.bits,
            self.value_bits,
            self.block_size,
            Some(self.group),
            self.fp_format,
        );
        Meta::for_blocks(self.heads, self.d, cfg, plan.layer(layer), rope)
    }
}

/// Checks a pool's length against the format; gives the number of blocks.
pub fn num_blocks(fmt: &BlockFormat, pool_len: usize) -> Result<usize> {
    let bb = fmt.block_bytes();
    if !pool_len.is_multiple_of(bb) {
        return Err(Error::shape(
            "pool",
            format!("[num_blocks, {bb}] bytes"),
            format!("{pool_len} bytes"),
        ));
    }
    Ok(pool_len / bb)
}

/// What [`write`] takes besides the pool.
#[derive(Clone, Copy, Debug)]
pub struct WriteArgs<'a> {
    /// Keys `[1, T, Hkv, D]` (token-major, as serving engines hold them), after RoPE.
    pub k: View4<'a>,
    /// Values, like `k`.
    pub v: View4<'a>,
    /// Slot of each token (`block * block_size + offset`; -1: padding, skipped), `[T]`.
    pub slots: &'a [i64],
    /// RoPE position of each token, `[T]` (pre-RoPE plans undo RoPE with them).
    pub positions: Option<&'a [i64]>,
}

/// Quantizes and packs tokens into the given slots of `pool` (layer 0 of `m`, built by
/// [`BlockFormat::meta`]). Only the addressed slots change; on an error nothing does.
pub fn write(pool: &mut [u8], fmt: &BlockFormat, m: &Meta, a: &WriteArgs) -> Result<()> {
    let nb = num_blocks(fmt, pool.len())?;
    let (h, d) = (fmt.heads, fmt.d);
    let t = check_kv_rows(fmt, a.k.shape, a.v.shape)?;
    if a.slots.len() != t {
        return Err(Error::shape(
            "slot_mapping",
            format!("[T={t}]"),
            format!("{} elements", a.slots.len()),
        ));
    }
    let pre_rope = m.plan.mode == Mode::PreRope;
    check_rope_inputs(m, a.positions.is_some())?;
    let positions = match (a.positions, pre_rope) {
        (Some(p), _) if p.len() != t => {
            return Err(Error::shape(
                "positions",
                format!("[T={t}]"),
                format!("{} elements", p.len()),
            ))
        }
        (Some(p), _) => {
            if let Some(x) = p.iter().find(|x| !(0..i32::MAX as i64).contains(*x)) {
                return Err(Error::value(
                    "positions",
                    "0 <= position < 2^31 - 1",
                    x.to_string(),
                ));
            }
            Some(p)
        }
        (None, true) => {
            return Err(Error::value(
                "positions",
                "the tokens' RoPE positions (the plan's mode is 'pre_rope')",
                "None",
            ))
        }
        (None, false) => None,
    };
    let bs = fmt.block_size;
    let total = (nb * bs) as i64;
    // Tokens by block, then by slot: one block is one unit of parallel work.
    let mut by_block: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
    for (ti, &s) in a.slots.iter().enumerate() {
        if s == -1 {
            continue;
        }
        if !(0..total).contains(&s) {
            return Err(Error::value(
                "slot_mapping",
                format!("-1 (padding) or a slot in 0..{total} (num_blocks * block_size)"),
                s.to_string(),
            ));
        }
        let s = s as usize;
        by_block.entry(s / bs).or_default().push((s % bs, ti));
    }
    for toks in by_block.values_mut() {
        toks.sort_unstable();
        if let Some(w) = toks.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::value(
                "slot_mapping",
                "distinct slots",
                format!("tokens {} and {} both at one slot", w[0].1, w[1].1),
            ));
        }
    }
    // Read and check every token before any byte of the pool changes.
    let hd = h * d;
    let mut k = vec![0f32; t * hd];
    let mut v = vec![0f32; t * hd];
    for ti in 0..t {
        for hh in 0..h {
            let o = ti * hd + hh * d;
            a.k.read_row(0, ti, hh, &mut k[o..o + d]);
            a.v.read_row(0, ti, hh, &mut v[o..o + d]);
        }
    }
    for (name, x) in [("k", &k), ("v", &v)] {
        if let Some(bad) = x.iter().find(|x| !x.is_finite()) {
            return Err(Error::value(name, "finite values", bad.to_string()));
        }
    }
    if pre_rope {
        let rope = m.rope.as_ref().expect("checked above");
        let p = positions.expect("checked above");
        for (tok, &pos) in k.chunks_exact_mut(hd).zip(p) {
            for head in tok.chunks_exact_mut(d) {
                rope.unapply(head, pos as i32);
            }
        }
    }
    let lay = &fmt.layout;
    let bb = fmt.block_bytes();
    let (kclip, vclip) = m.clips(0);
    let quant = fmt.bits < 16;
    // The touched blocks only (a decode step writes one slot of a large pool): disjoint
    // slices carved in block order, one block per unit of parallel work.
    let mut jobs = Vec::with_capacity(by_block.len());
    let mut rest: &mut [u8] = pool;
    let mut at = 0;
    for (&bi, toks) in &by_block {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((bi - at) * bb);
        let (bytes, tail) = tail.split_at_mut(bb);
        jobs.push((bytes, toks.as_slice()));
        rest = tail;
        at = bi + 1;
    }
    jobs.into_par_iter().for_each(|(bytes, toks)| {
        // Runs of consecutive slots are written as one chunk.
        let mut i = 0;
        while i < toks.len() {
            let mut j = i + 1;
            while j < toks.len() && toks[j].0 == toks[j - 1].0 + 1 {
                j += 1;
            }
            let n = j - i;
            let mut kr = Vec::with_capacity(n * hd);
            let mut vr = Vec::with_capacity(n * hd);
            for &(_, ti) in &toks[i..j] {
                kr.extend_from_slice(&k[ti * hd..(ti + 1) * hd]);
                vr.extend_from_slice(&v[ti * hd..(ti + 1) * hd]);
            }
            let u0 = toks[i].0;
            if quant {
                let keys = m.keys_to_stored(0, &kr, n);
                if let Some(hv) = &m.had_v {
                    vr.chunks_exact_mut(d).for_each(|x| hv.forward(x));
                }
                let c = Chunk {
                    keys: &keys,
                    values: &vr,
                    n,
                };
                write_quant_per_token(bytes, lay, u0, &c, kclip, vclip);
            } else {
                let keys = m.keys_raw_cm(&kr, n);
                let c = Chunk {
                    keys: &keys,
                    values: &vr,
                    n,
                };
                write_fp(bytes, lay, u0, &c, fmt.fp_format);
            }
            i = j;
        }
    });
    Ok(())
}

/// Keys and values `[1, T, Hkv, D]` alike (token-major, as serving engines hold them); gives
/// `T`.
fn check_kv_rows(fmt: &BlockFormat, k: [usize; 4], v: [usize; 4]) -> Result<usize> {
    let (h, d, t) = (fmt.heads, fmt.d, k[1]);
    for (name, x) in [("k", k), ("v", v)] {
        if x != [1, t, h, d] {
            return Err(Error::shape(
                name,
                format!("[T, Hkv={h}, D={d}] (k and v alike)"),
                format!("{:?}", &x[1..]),
            ));
        }
    }
    Ok(t)
}

/// The rule of pre-RoPE plans: keys arrive after RoPE, so a write needs their positions and
/// the model's RoPE to undo it.
fn check_rope_inputs(m: &Meta, positions_given: bool) -> Result<()> {
    if m.plan.mode != Mode::PreRope {
        return Ok(());
    }
    if !positions_given {
        return Err(Error::value(
            "positions",
            "the tokens' RoPE positions (the plan's mode is 'pre_rope')",
            "None",
        ));
    }
    if m.rope.is_none() {
        return Err(Error::value(
            "rope_inv_freq",
            "the model's RoPE inverse frequencies (the plan's mode is 'pre_rope')",
            "None",
        ));
    }
    Ok(())
}

/// The checks of an attention call that need no table values (host and device alike):
/// queries `[1, Tq, Hq, D]`, `B` requests, table and offset lengths, options.
fn check_attend_shapes(
    fmt: &BlockFormat,
    q_shape: [usize; 4],
    opts: &Options,
    b: usize,
    qsl_len: usize,
    table_len: usize,
    max_blocks: usize,
) -> Result<Masking> {
    let [one, _, hq, d] = q_shape;
    if one != 1 || d != fmt.d || hq == 0 || hq % fmt.heads != 0 {
        return Err(Error::shape(
            "q",
            format!("[Tq, Hq (a multiple of {}), D={}]", fmt.heads, fmt.d),
            format!("{:?}", &q_shape[1..]),
        ));
    }
    if opts.positions.is_some() {
        return Err(Error::value(
            "positions",
            "None (a pool's positions are token indices)",
            "given",
        ));
    }
    if qsl_len != b + 1 {
        return Err(Error::shape(
            "query_start_loc",
            format!("[B + 1 = {}] (B from seq_lens)", b + 1),
            format!("{qsl_len} elements"),
        ));
    }
    if table_len != b * max_blocks {
        return Err(Error::shape(
            "block_table",
            format!("[B={b}, max_blocks]"),
            format!("{table_len} elements"),
        ));
    }
    attend::check_options(opts, d)
}

/// What [`attend`] takes besides the pool.
#[derive(Clone, Copy, Debug)]
pub struct AttendArgs<'a> {
    /// Queries `[1, Tq_total, Hq, D]`, ragged over requests, after RoPE.
    pub q: View4<'a>,
    /// `[B, max_blocks]` row-major block ids.
    pub block_table: &'a [i64],
    /// Blocks per row of the table.
    pub max_blocks: usize,
    /// Tokens of each request, `[B]`.
    pub seq_lens: &'a [i64],
    /// `[B + 1]`: request `b`'s queries are rows `q_start[b] .. q_start[b+1]` of `q`.
    pub query_start_loc: &'a [i64],
    /// Masking and scale (`positions` must be `None`: positions are token indices).
    pub opts: Options<'a>,
    /// Rows read beside the pool: a serving engine's recent window (CPU only).
    pub recent: Option<Recent<'a>>,
}

/// Attention of each request's queries over its tokens in the pool; writes
/// `[Tq_total, Hq, D]` rows into `out` and, when given, each row's log-sum-exp
/// (`[Tq_total, Hq]`). A request's queries are its last `q_end - q_start` positions.
pub fn attend(
    level: Level,
    pool: &[u8],
    fmt: &BlockFormat,
    m: &Meta,
    a: &AttendArgs,
    out: &mut OutData,
    lse: Option<&mut [f32]>,
) -> Result<()> {
    let nb = num_blocks(fmt, pool.len())?;
    let [_, tq_total, hq, d] = a.q.shape;
    let b = a.seq_lens.len();
    let masking = check_attend_shapes(
        fmt,
        a.q.shape,
        &a.opts,
        b,
        a.query_start_loc.len(),
        a.block_table.len(),
        a.max_blocks,
    )?;
    let qsl = a.query_start_loc;
    if qsl[0] != 0 || qsl[b] != tq_total as i64 || qsl.windows(2).any(|w| w[1] < w[0]) {
        return Err(Error::value(
            "query_start_loc",
            format!("non-decreasing offsets from 0 to Tq = {tq_total}"),
            format!("{qsl:?}"),
        ));
    }
    let bs = fmt.block_size;
    let mut rows = Queries {
        q0: Vec::with_capacity(b),
        tq: Vec::with_capacity(b),
        hq,
        token_major: true,
    };
    let mut qpos = vec![0i32; tq_total];
    let mut pages = Vec::with_capacity(b);
    let lay = &fmt.layout;
    let bb = fmt.block_bytes();
    for r in 0..b {
        let len = a.seq_lens[r];
        let nq = (qsl[r + 1] - qsl[r]) as usize;
        if !(0..i32::MAX as i64).contains(&len) || (nq as i64) > len {
            return Err(Error::value(
                "seq_lens",
                format!("0 <= seq_lens[{r}] < 2^31 - 1 and at least its {nq} queries"),
                len.to_string(),
            ));
        }
        let len = len as usize;
        let need = len.div_ceil(bs);
        if need > a.max_blocks {
            return Err(Error::shape(
                "block_table",
                format!("at least {need} blocks per row (seq_lens[{r}] = {len})"),
                format!("{} blocks per row", a.max_blocks),
            ));
        }
        let q0 = qsl[r] as usize;
        rows.q0.push(q0);
        rows.tq.push(nq);
        for i in 0..nq {
            qpos[q0 + i] = (len - nq + i) as i32;
        }
        let mut views = Vec::with_capacity(need);
        for j in 0..need {
            let blk = a.block_table[r * a.max_blocks + j];
            if !(0..nb as i64).contains(&blk) {
                return Err(Error::value(
                    "block_table",
                    format!("block ids in 0..{nb} for the blocks seq_lens covers"),
                    format!("{blk} at [{r}, {j}]"),
                ));
            }
            let blk = blk as usize;
            let live = bs.min(len - j * bs);
            let first = (j * bs) as i32;
            views.push(PageView {
                bytes: &pool[blk * bb..(blk + 1) * bb],
                lay,
                pos: Positions::From(first),
                start: 0,
                len: live,
                min_pos: first,
                max_pos: first + live as i32 - 1,
            });
        }
        pages.push(views);
    }
    let q = attend::dense_queries(&rows, d, masking.scale, |b, h, t, row| {
        a.q.read_row(0, qsl[b] as usize + t, h, row)
    })?;
    let job = Job {
        meta: m,
        layer: 0,
        pages,
        rows,
        qpos,
        causal: a.opts.causal,
        softcap: a.opts.softcap,
        masking,
        recent: a.recent,
    };
    attend::run(level, &job, q, out, lse)
}

/// The layer's permutation and RoPE frequencies in device memory for one call (a pool has no
/// store to keep them; they are a few KiB).
struct LayerConsts<'a> {
    bk: &'a Arc<dyn Backend>,
    perm: u64,
    inv_freq: u64,
}

impl<'a> LayerConsts<'a> {
    fn upload(bk: &'a Arc<dyn Backend>, m: &Meta) -> Result<Self> {
        let mut c = LayerConsts {
            bk,
            perm: 0,
            inv_freq: 0,
        };
        let perm: &[u32] = &m.plan.key_perm[0];
        c.perm = bk.temp((perm.len() * 4).max(4))?;
        bk.h2d(c.perm, bytemuck::cast_slice(perm))?;
        if let Some(r) = &m.rope {
            c.inv_freq = bk.temp(r.inv_freq.len() * 4)?;
            bk.h2d(c.inv_freq, bytemuck::cast_slice(&r.inv_freq))?;
        }
        Ok(c)
    }
}

impl Drop for LayerConsts<'_> {
    fn drop(&mut self) {
        for p in [self.perm, self.inv_freq] {
            if p != 0 {
                self.bk.free_temp(p);
            }
        }
    }
}

fn pool_ref(fmt: &BlockFormat, pool: u64, num_blocks: usize) -> PoolRef {
    PoolRef {
        pool,
        num_blocks,
        block_bytes: fmt.block_bytes(),
        block_size: fmt.block_size,
        layout: RkvLayout::from(&fmt.layout),
    }
}

/// [`write`] for a pool in device memory (`num_blocks` blocks at `pool`), on the backend's
/// current stream. The slot mapping and positions stay on the device: slots outside the
/// pool are skipped there rather than refused (checking them would wait for the device).
pub fn write_device(
    bk: &Arc<dyn Backend>,
    fmt: &BlockFormat,
    m: &Meta,
    pool: u64,
    num_blocks: usize,
    w: &PoolWrite,
) -> Result<()> {
    check_kv_rows(fmt, w.k.shape, w.v.shape)?;
    if w.k.dtype != w.v.dtype {
        return Err(Error::dtype(
            "v",
            format!("k's dtype ({:?})", w.k.dtype),
            format!("{:?}", w.v.dtype),
        ));
    }
    check_rope_inputs(m, w.positions != 0)?;
    let c = LayerConsts::upload(bk, m)?;
    launch::paged_write(
        bk,
        m,
        &pool_ref(fmt, pool, num_blocks),
        w,
        c.perm,
        c.inv_freq,
    )
}

/// [`attend`] for a pool and block tables in device memory, on the backend's current
/// stream: `q` and `out` are `[1, Tq_total, Hq, D]`, `lse` (optional) float32
/// `[Tq_total, Hq]`. The tables are read on the device (block ids outside the pool read as
/// no tokens; a request's rows past `max_query_len` are not computed).
#[allow(clippy::too_many_arguments)]
pub fn attend_device(
    bk: &Arc<dyn Backend>,
    fmt: &BlockFormat,
    m: &Meta,
    pool: u64,
    num_blocks: usize,
    tables: &PoolTables,
    q: &DevTensor,
    out: &DevTensor,
    lse: Option<&DevTensor>,
    opts: &Options,
) -> Result<()> {
    let mk = check_attend_shapes(
        fmt,
        q.shape,
        opts,
        tables.batch,
        tables.batch + 1,
        tables.batch * tables.max_blocks,
        tables.max_blocks,
    )?;
    if out.shape != q.shape {
        return Err(Error::shape(
            "out",
            format!("q's shape {:?}", &q.shape[1..]),
            format!("{:?}", &out.shape[1..]),
        ));
    }
    let c = LayerConsts::upload(bk, m)?;
    let io = AttendIo {
        q,
        out,
        lse,
        perm: c.perm,
        inv_freq: c.inv_freq,
    };
    let src = KvSource::Pool(pool_ref(fmt, pool, num_blocks), *tables);
    launch::attend(bk, m, &src, &io, opts.causal, opts.softcap, &mk)
}
