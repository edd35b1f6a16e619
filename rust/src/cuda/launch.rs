//! Launches of the kernels from described memory: attention over a list of page
//! descriptors (`RkvPage`), the Hadamard transform and the attention mass. Nothing here
//! knows who owns the pages (the store builds its list; see `crate::store`).

use std::sync::Arc;

use super::abi::{
    self, dtype_code, RkvFwhtParams, RkvMassParams, RkvPage, MASS_TILE, SMEM_DEFAULT, THREADS,
};
use super::backend::{Backend, Launch};
use crate::attend::Masking;
use crate::config::Meta;
use crate::device::DevTensor;
use crate::error::{Error, Result};
use crate::saliency::{check_dims, MassDims};

/// Pages of an attention launch: `pages[off[b]..off[b+1]]` are request `b`'s, `most` the
/// largest count of one request.
pub struct PageList<'a> {
    /// Descriptors.
    pub pages: &'a [RkvPage],
    /// Offsets, `[B + 1]`.
    pub off: &'a [i32],
    /// Most pages of one request.
    pub most: usize,
}

/// A caller-owned pool on the device and the block tables that address it
/// (`rotatekv.paged`): every address is device memory the kernels read in place, so nothing
/// is mirrored on the host or uploaded per call.
#[derive(Clone, Copy, Debug)]
pub struct PoolRef {
    /// Pool bytes, `[num_blocks][block_bytes]`.
    pub pool: u64,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Bytes of one block.
    pub block_bytes: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// The blocks' layout (`crate::format::Layout::block`).
    pub layout: abi::RkvLayout,
}

/// Block tables of a paged attention launch (int32 device arrays, as serving engines keep
/// them).
#[derive(Clone, Copy, Debug)]
pub struct PoolTables {
    /// `[B][max_blocks]` block ids.
    pub block_table: u64,
    /// Blocks per row of the table.
    pub max_blocks: usize,
    /// `[B]` tokens per request.
    pub seq_lens: u64,
    /// `[B + 1]` query offsets.
    pub query_start: u64,
    /// Requests.
    pub batch: usize,
    /// The most queries of one request (bounds the grid; rows past a request's own are
    /// skipped on the device).
    pub max_query_len: usize,
}

/// Where an attention launch finds its keys and query positions.
pub enum KvSource<'a> {
    /// Store pages: descriptors and the lag-shifted query positions `[B*Tq]`, uploaded per
    /// call (the store's list changes with every append).
    Pages(&'a PageList<'a>, &'a [i32]),
    /// A pool through block tables read on the device; positions are token indices.
    Pool(PoolRef, PoolTables),
}

/// What a device attention launch writes besides the queries' shape.
pub struct AttendIo<'a> {
    /// Queries `[B, Hq, Tq, D]` (pools: `[1, Tq_total, Hq, D]`, token-major).
    pub q: &'a DevTensor,
    /// Output, like `q`.
    pub out: &'a DevTensor,
    /// Log-sum-exps, contiguous float32 `[B, Hq, Tq]` (pools: `[Tq_total, Hq]`).
    pub lse: Option<&'a DevTensor>,
    /// Device permutation of the layer.
    pub perm: u64,
    /// Device RoPE inverse frequencies (0 without RoPE).
    pub inv_freq: u64,
}

fn narrow(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::value(name, "at most 2^31 - 1", v.to_string()))
}

/// Fused attention (split-K over pages, then one combine launch), on the backend's current
/// stream: one kernel for store pages and caller-owned pools.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    bk: &Arc<dyn Backend>,
    m: &Meta,
    src: &KvSource,
    io: &AttendIo,
    causal: bool,
    softcap: Option<f32>,
    mk: &Masking,
) -> Result<()> {
    let (q, out) = (io.q, io.out);
    let d = q.shape[3];
    // Rows are (request, query head, query token): store queries are [B, Hq, Tq, D], a
    // pool's [1, Tq_total, Hq, D] ragged over requests (strides swapped so the kernel's
    // q_s[1] is the head stride and q_s[2] the token stride).
    let (b, hq, tq, most) = match src {
        KvSource::Pages(list, _) => (q.shape[0], q.shape[1], q.shape[2], list.most),
        KvSource::Pool(_, t) => (t.batch, q.shape[2], t.max_query_len, t.max_blocks),
    };
    let strides = |t: &DevTensor| -> [i64; 4] {
        let s = t.strides.map(|x| x as i64);
        match src {
            KvSource::Pages(..) => s,
            KvSource::Pool(..) => [0, s[2], s[1], s[3]],
        }
    };
    if b == 0 || tq == 0 || hq == 0 {
        return Ok(());
    }
    if b > 65535 {
        return Err(Error::shape(
            "seq_lens",
            "at most 65535 requests (grid limits)",
            b.to_string(),
        ));
    }
    let (rows, tile, smem) = abi::attend_tiles(m, hq, tq);
    let base = abi::attend_grid(m, b, hq, tq, rows, 1);
    let splits = abi::attend_splits((base[1] * base[2]) as usize, most, 2 * bk.sm_count());
    let mut temps = Vec::new();
    let res = (|| -> Result<()> {
        let up = |temps: &mut Vec<u64>, bytes: &[u8]| -> Result<u64> {
            let p = bk.temp(bytes.len().max(4))?;
            temps.push(p);
            bk.h2d(p, bytes)?;
            Ok(p)
        };
        let work = bk.temp(b * splits * hq * tq * (d + 2) * 4)?;
        temps.push(work);
        let rope = m.rope.as_ref();
        let mut p = abi::RkvAttendParams {
            q: q.ptr,
            perm: io.perm,
            inv_freq: io.inv_freq,
            work,
            q_s: strides(q),
            batch: b as i32,
            hq: narrow("q", hq)?,
            tq: narrow("q", tq)?,
            d: d as i32,
            heads: m.heads as i32,
            group_heads: m.plan.group_heads as i32,
            q_dtype: dtype_code(q.dtype),
            fp_format: abi::fp_code(m.cfg.fp_format),
            mode: abi::mode_code(m.plan.mode),
            rotate_keys: m.plan.rotates_keys() as i32,
            rotate_values: m.plan.rotate_values as i32,
            rot_half: rope.map_or(0, |r| r.half() as i32),
            causal: causal as i32,
            window: mk.window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
            splits: splits as i32,
            rows_per_block: rows as i32,
            tile_tokens: tile as i32,
            scale: mk.scale,
            softcap: softcap.unwrap_or(0.0),
            rope_scaling: rope.map_or(1.0, |r| r.scaling),
            lay: abi::layouts(m),
            ..Default::default()
        };
        let mut query_start = 0;
        match src {
            KvSource::Pages(list, qpos) => {
                p.pages = up(&mut temps, bytemuck::cast_slice(list.pages))?;
                p.page_off = up(&mut temps, bytemuck::cast_slice(list.off))?;
                p.qpos = up(&mut temps, bytemuck::cast_slice(qpos))?;
            }
            KvSource::Pool(pool, t) => {
                p.pool = pool.pool;
                p.block_table = t.block_table;
                p.seq_lens = t.seq_lens;
                p.query_start = t.query_start;
                p.block_bytes = pool.block_bytes as i64;
                p.num_blocks = narrow("pool", pool.num_blocks)?;
                p.max_blocks = narrow("block_table", t.max_blocks)?;
                p.block_size = pool.block_size as i32;
                p.lay[0] = pool.layout;
                query_start = t.query_start;
            }
        }
        let grid = abi::attend_grid(m, b, hq, tq, rows, splits);
        bk.launch(Launch::Attend(&p, grid, smem))?;
        let c = abi::RkvCombineParams {
            work,
            out: out.ptr,
            lse: io.lse.map_or(0, |l| l.ptr),
            query_start,
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

/// Tokens of a paged write: keys and values `[1, T, H, D]` (token-major) and their slot
/// mapping and positions, device arrays of int32 or int64.
#[derive(Clone, Copy, Debug)]
pub struct PoolWrite<'a> {
    /// Keys, after RoPE.
    pub k: &'a DevTensor,
    /// Values.
    pub v: &'a DevTensor,
    /// `[T]` slots (-1: padding).
    pub slots: u64,
    /// Whether `slots` is int64.
    pub slots_i64: bool,
    /// `[T]` RoPE positions (pre-RoPE plans), or 0.
    pub positions: u64,
    /// Whether `positions` is int64.
    pub pos_i64: bool,
}

/// Quantizes and packs tokens into a pool (layer 0 of `m`), on the
/// backend's current stream. Slots are read on the device: slots outside the pool are
/// skipped there. `perm`, `inv_freq`: device arrays of the layer (as for [`attend`]).
pub fn paged_write(
    bk: &Arc<dyn Backend>,
    m: &Meta,
    pool: &PoolRef,
    w: &PoolWrite,
    perm: u64,
    inv_freq: u64,
) -> Result<()> {
    let t = w.k.shape[1];
    if t == 0 {
        return Ok(());
    }
    let s3 = |x: &DevTensor| {
        [
            x.strides[1] as i64,
            x.strides[2] as i64,
            x.strides[3] as i64,
        ]
    };
    let rope = m.rope.as_ref();
    let p = abi::RkvPagedWriteParams {
        k: w.k.ptr,
        v: w.v.ptr,
        slots: w.slots,
        positions: w.positions,
        pool: pool.pool,
        perm,
        inv_freq,
        k_s: s3(w.k),
        v_s: s3(w.v),
        block_bytes: pool.block_bytes as i64,
        num_slots: (pool.num_blocks * pool.block_size) as i64,
        n_tok: narrow("k", t)?,
        heads: m.heads as i32,
        d: m.d as i32,
        group_heads: m.plan.group_heads as i32,
        dtype: dtype_code(w.k.dtype),
        slots_i64: w.slots_i64 as i32,
        pos_i64: w.pos_i64 as i32,
        block_size: pool.block_size as i32,
        mode: abi::mode_code(m.plan.mode),
        rot_half: rope.map_or(0, |r| r.half() as i32),
        pack: abi::RkvPack::of(m, 0),
        rope_scaling: rope.map_or(1.0, |r| r.scaling),
        pad1: 0.0,
        lay: pool.layout,
    };
    let (grid, smem) = abi::append_shape(m, t);
    bk.launch(Launch::PagedWrite(&p, grid, smem))
}

/// `y[r] = H x[r]` (or `Hᵀ`) for `rows` contiguous rows of `n` elements.
pub fn fwht(
    b: &Arc<dyn Backend>,
    x: &DevTensor,
    y: &DevTensor,
    rows: usize,
    n: usize,
    inverse: bool,
) -> Result<()> {
    let contiguous = |t: &DevTensor| {
        t.strides[3] == 1
            && t.strides[2] == t.shape[3]
            && t.strides[1] == t.shape[2] * t.shape[3]
            && t.strides[0] == t.shape[1] * t.shape[2] * t.shape[3]
    };
    if x.shape != y.shape || x.dtype != y.dtype || !contiguous(x) || !contiguous(y) {
        return Err(Error::shape(
            "x",
            "contiguous x and out of one shape and dtype",
            format!("{:?} / {:?}", x.shape, y.shape),
        ));
    }
    if rows == 0 {
        return Ok(());
    }
    // One block per row up to a few per SM; rows that do not fit in shared memory are
    // transformed in a global scratch row per block.
    let big = n * 4 > SMEM_DEFAULT;
    // Large rows need a scratch row per block: keep the scratch within 256 MiB.
    let most = if big {
        (256 << 20) / (n * 4)
    } else {
        usize::MAX
    };
    let grid = rows.min(8 * b.sm_count().max(1)).min(most).max(1);
    let scratch = if big { b.temp(grid * n * 4)? } else { 0 };
    let p = RkvFwhtParams {
        x: x.ptr,
        y: y.ptr,
        rows: rows as i64,
        n: n as i32,
        dtype: dtype_code(x.dtype),
        inverse: inverse as i32,
        pad: 0,
    };
    let smem = if big { 0 } else { n * 4 };
    let res = b.launch(Launch::Fwht(&p, scratch, [grid as u32, 1, 1], smem));
    if big {
        b.free_temp(scratch);
    }
    res
}

/// Device addresses of [`attention_mass`]'s arrays (layouts as in `RkvMassParams`; `k_valid`
/// and `prior` may be 0).
#[derive(Clone, Copy, Debug)]
#[allow(missing_docs)]
pub struct MassBuffers {
    pub q: u64,
    pub k: u64,
    pub q_pos: u64,
    pub k_pos: u64,
    pub k_valid: u64,
    pub prior: u64,
    pub lse: u64,
    pub mass: u64,
    pub count: u64,
}

/// Attention mass of a chunk's keys on a device (`crate::saliency` has the CPU version):
/// `rkv_mass_lse` then `rkv_mass_keys` on the current stream.
pub fn attention_mass(
    b: &Arc<dyn Backend>,
    buf: &MassBuffers,
    dims: MassDims,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    lag: usize,
) -> Result<()> {
    check_dims(dims, scale, softcap, window)?;
    let narrow = |name: &str, v: usize| {
        i32::try_from(v).map_err(|_| Error::value(name, "at most 2^31 - 1", v.to_string()))
    };
    if dims.b > 65535 || dims.hq > 65535 {
        return Err(Error::shape(
            "q",
            "at most 65535 sequences and query heads (grid limits)",
            format!("{dims:?}"),
        ));
    }
    let p = RkvMassParams {
        q: buf.q,
        k: buf.k,
        q_pos: buf.q_pos,
        k_pos: buf.k_pos,
        k_valid: buf.k_valid,
        prior: buf.prior,
        lse: buf.lse,
        mass: buf.mass,
        count: buf.count,
        batch: narrow("q", dims.b)?,
        hq: narrow("q", dims.hq)?,
        tq: narrow("q", dims.tq)?,
        hkv: narrow("k", dims.hkv)?,
        tk: narrow("k", dims.tk)?,
        d: narrow("q", dims.d)?,
        window: narrow("window", window.unwrap_or(0))?,
        lag: narrow("lag", lag)?,
        scale,
        softcap: softcap.unwrap_or(0.0),
    };
    let threads = THREADS as usize;
    let smem_lse = (dims.d + 2 * threads) * 4;
    let smem_keys = MASS_TILE * (dims.d + 3) * 4;
    if smem_lse.max(smem_keys) > SMEM_DEFAULT {
        return Err(Error::shape(
            "q",
            "a head size whose query tile fits 48 KiB of shared memory",
            dims.d.to_string(),
        ));
    }
    if dims.b == 0 || dims.tk == 0 {
        return Ok(());
    }
    if dims.tq > 0 && dims.hq > 0 {
        let grid = [dims.tq as u32, dims.hq as u32, dims.b as u32];
        b.launch(Launch::Mass(&p, false, grid, smem_lse))?;
    }
    let grid = [dims.tk.div_ceil(threads) as u32, dims.b as u32, 1];
    b.launch(Launch::Mass(&p, true, grid, smem_keys))
}
