//! Kernel parameter structs, mirrored field by field from `cuda/rotatekv.cuh` (`#[repr(C)]`,
//! 8-byte fields first so neither side pads differently), and the launch shapes the host
//! computes for them. Both the GPU launcher and the host emulation use these.

use crate::config::{KeyLayout, Meta};
use crate::format::{FpFormat, Layout, NUM_CLASSES};
use crate::rotation::Mode;
use crate::tensor::DType;

/// Threads per block of every kernel (`RKV_THREADS`).
pub const THREADS: u32 = 128;

/// Dynamic shared memory a kernel may use without opting in.
pub const SMEM_DEFAULT: usize = 48 * 1024;

/// Element types of tensors crossing the API (`RKV_F32`, ...).
pub const F32: i32 = 0;
/// IEEE half.
pub const F16: i32 = 1;
/// bfloat16.
pub const BF16: i32 = 2;

/// A page format (`RkvLayout`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct RkvLayout {
    pub bits: i32,
    pub per_channel: i32,
    pub cap: i32,
    pub heads: i32,
    pub d: i32,
    pub group: i32,
    pub tag_off: i32,
    pub head_off: i32,
    pub head_bytes: i32,
    pub k_row: i32,
    pub k_scale: i32,
    pub k_zero: i32,
    pub v_codes: i32,
    pub v_row: i32,
    pub v_scale: i32,
    pub v_zero: i32,
    pub total: i32,
    pub vbits: i32,
}

impl From<&Layout> for RkvLayout {
    fn from(l: &Layout) -> Self {
        let i = |x: usize| x as i32;
        RkvLayout {
            bits: l.bits as i32,
            per_channel: l.per_channel as i32,
            cap: i(l.cap),
            heads: i(l.heads),
            d: i(l.d),
            group: i(l.group),
            tag_off: i(l.tag_off),
            head_off: i(l.head_off),
            head_bytes: i(l.head_bytes),
            k_row: i(l.k_row),
            k_scale: i(l.k_scale),
            k_zero: i(l.k_zero),
            v_codes: i(l.v_codes),
            v_row: i(l.v_row),
            v_scale: i(l.v_scale),
            v_zero: i(l.v_zero),
            total: i(l.total),
            vbits: l.vbits as i32,
        }
    }
}

/// One live page as attention reads it (`RkvPage`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(missing_docs)]
pub struct RkvPage {
    pub data: u64,
    pub cls: i32,
    pub start: i32,
    pub len: i32,
    pub pad: i32,
}

/// Source rows of one appended token (`RkvSrc`); strides in elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(missing_docs)]
pub struct RkvSrc {
    pub k: u64,
    pub v: u64,
    pub k_sh: i64,
    pub k_sc: i64,
    pub v_sh: i64,
    pub v_sc: i64,
    pub dtype: i32,
    pub round: i32,
}

/// Destination slot of one appended token (`RkvDst`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(missing_docs)]
pub struct RkvDst {
    pub page: u64,
    pub cls: i32,
    pub slot: i32,
    pub pos: i32,
    pub tag: i32,
    pub key_row: i32,
    pub pad: i32,
}

/// How a layer's tokens are packed (`RkvPack`): the plan's transforms, the 16-bit format
/// and the clips.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct RkvPack {
    pub rotate_keys: i32,
    pub rotate_values: i32,
    pub fp_format: i32,
    pub pad: i32,
    pub key_clip: f32,
    pub value_clip: f32,
}

impl RkvPack {
    /// The packing of layer `layer` of a store or pool.
    pub fn of(m: &Meta, layer: usize) -> Self {
        let (key_clip, value_clip) = m.clips(layer);
        RkvPack {
            rotate_keys: m.plan.rotates_keys() as i32,
            rotate_values: m.plan.rotate_values as i32,
            fp_format: fp_code(m.cfg.fp_format),
            pad: 0,
            key_clip,
            value_clip,
        }
    }
}

/// `rkv_append` parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct RkvAppendParams {
    pub src: u64,
    pub dst: u64,
    pub perm: u64,
    pub key_out: u64,
    pub n_tok: i32,
    pub heads: i32,
    pub d: i32,
    pub group_heads: i32,
    pub pack: RkvPack,
    pub lay: [RkvLayout; NUM_CLASSES],
}

/// `rkv_channel_keys` parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct RkvChannelParams {
    pub keys: u64,
    pub pages: u64,
    pub n_pages: i32,
    pub heads: i32,
    pub d: i32,
    pub pad: i32,
    pub key_clip: f32,
    pub pad1: f32,
    pub lay: [RkvLayout; NUM_CLASSES],
}

/// `rkv_attend` parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct RkvAttendParams {
    pub q: u64,
    pub pages: u64,
    pub page_off: u64,
    pub qpos: u64,
    pub pool: u64,
    pub block_table: u64,
    pub seq_lens: u64,
    pub query_start: u64,
    pub block_bytes: i64,
    pub num_blocks: i32,
    pub max_blocks: i32,
    pub block_size: i32,
    pub pad2: i32,
    pub perm: u64,
    pub inv_freq: u64,
    pub work: u64,
    pub q_s: [i64; 4],
    pub batch: i32,
    pub hq: i32,
    pub tq: i32,
    pub d: i32,
    pub heads: i32,
    pub group_heads: i32,
    pub q_dtype: i32,
    pub fp_format: i32,
    pub mode: i32,
    pub rotate_keys: i32,
    pub rotate_values: i32,
    pub rot_half: i32,
    pub causal: i32,
    pub window: i32,
    pub splits: i32,
    pub rows_per_block: i32,
    pub tile_tokens: i32,
    pub pad0: i32,
    pub scale: f32,
    pub softcap: f32,
    pub rope_scaling: f32,
    pub pad1: f32,
    pub lay: [RkvLayout; NUM_CLASSES],
}

/// `rkv_combine` parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct RkvCombineParams {
    pub work: u64,
    pub out: u64,
    pub lse: u64,
    pub query_start: u64,
    pub o_s: [i64; 4],
    pub batch: i32,
    pub hq: i32,
    pub tq: i32,
    pub d: i32,
    pub splits: i32,
    pub o_dtype: i32,
    pub rotate_values: i32,
    pub pad: i32,
}

/// `rkv_paged_write` parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct RkvPagedWriteParams {
    pub k: u64,
    pub v: u64,
    pub slots: u64,
    pub positions: u64,
    pub pool: u64,
    pub perm: u64,
    pub inv_freq: u64,
    pub k_s: [i64; 3],
    pub v_s: [i64; 3],
    pub block_bytes: i64,
    pub num_slots: i64,
    pub n_tok: i32,
    pub heads: i32,
    pub d: i32,
    pub group_heads: i32,
    pub dtype: i32,
    pub slots_i64: i32,
    pub pos_i64: i32,
    pub block_size: i32,
    pub mode: i32,
    pub rot_half: i32,
    pub pack: RkvPack,
    pub rope_scaling: f32,
    pub pad1: f32,
    pub lay: RkvLayout,
}

/// `rkv_fwht` parameters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct RkvFwhtParams {
    pub x: u64,
    pub y: u64,
    pub rows: i64,
    pub n: i32,
    pub dtype: i32,
    pub inverse: i32,
    pub pad: i32,
}

/// `rkv_mass_lse` / `rkv_mass_keys` parameters (cuda/saliency.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[allow(missing_docs)]
pub struct RkvMassParams {
    pub q: u64,
    pub k: u64,
    pub q_pos: u64,
    pub k_pos: u64,
    pub k_valid: u64,
    pub prior: u64,
    pub lse: u64,
    pub mass: u64,
    pub count: u64,
    pub batch: i32,
    pub hq: i32,
    pub tq: i32,
    pub hkv: i32,
    pub tk: i32,
    pub d: i32,
    pub window: i32,
    pub lag: i32,
    pub scale: f32,
    pub softcap: f32,
}

/// Query rows `rkv_mass_keys` stages through shared memory at a time (`RKV_MASS_TILE`).
pub const MASS_TILE: usize = 8;

/// The element-type code the kernels use.
pub fn dtype_code(d: DType) -> i32 {
    match d {
        DType::F32 => F32,
        DType::F16 => F16,
        DType::BF16 => BF16,
    }
}

/// The class layouts of a store, by class index.
pub fn layouts(meta: &Meta) -> [RkvLayout; NUM_CLASSES] {
    std::array::from_fn(|i| RkvLayout::from(&meta.layouts[i]))
}

/// The kernels' code of a 16-bit format.
pub fn fp_code(f: FpFormat) -> i32 {
    match f {
        FpFormat::F16 => F16,
        FpFormat::BF16 => BF16,
    }
}

/// The kernels' code of a plan mode.
pub fn mode_code(m: Mode) -> i32 {
    match m {
        Mode::PreRope => 0,
        Mode::PostRope => 1,
        Mode::None => 2,
    }
}

/// Launch shape of `rkv_append`: grid `(n_tok, groups)` and dynamic shared memory bytes.
pub fn append_shape(meta: &Meta, n_tok: usize) -> ([u32; 3], usize) {
    let n = meta.plan.group_len();
    let groups = meta.heads / meta.plan.group_heads;
    (
        [n_tok as u32, groups as u32, 1],
        3 * n * 4 + n.div_ceil(4) * 4,
    )
}

/// Whether a store's keys go through `rkv_channel_keys`.
pub fn per_channel(meta: &Meta) -> bool {
    meta.cfg.key_layout == KeyLayout::PerChannel
}

/// Query rows per block, tokens per tile and shared memory bytes of `rkv_attend`, chosen so
/// that the block's state fits the default shared memory (no opt-in needed).
pub fn attend_tiles(meta: &Meta, hq: usize, tq: usize) -> (usize, usize, usize) {
    let d = meta.d;
    let n = meta.plan.group_len();
    let rows_g = meta.plan.group_heads * (hq / meta.heads) * tq;
    // Q, ACC, QR [r][d]; S [r][tt]; M, L, CORR [r]; tile [tt][n] (cuda/attend.cu).
    let floats = |r: usize, tt: usize| 3 * r * d + r * tt + 3 * r + tt * n;
    let mut r = rows_g.min(32);
    loop {
        let mut tt = 32;
        while tt > 1 && floats(r, tt) * 4 > SMEM_DEFAULT {
            tt /= 2;
        }
        if floats(r, tt) * 4 <= SMEM_DEFAULT || r == 1 {
            return (r, tt, floats(r, tt) * 4);
        }
        r /= 2;
    }
}

/// Grid of `rkv_attend` for `batch` sequences and `splits` page ranges per sequence.
pub fn attend_grid(
    meta: &Meta,
    batch: usize,
    hq: usize,
    tq: usize,
    rows_per_block: usize,
    splits: usize,
) -> [u32; 3] {
    let rows_g = meta.plan.group_heads * (hq / meta.heads) * tq;
    let groups = meta.heads / meta.plan.group_heads;
    [
        splits as u32,
        (groups * rows_g.div_ceil(rows_per_block)) as u32,
        batch as u32,
    ]
}

/// Page ranges per sequence: enough blocks to fill `target_blocks` (about two per SM), at
/// least 4 pages per range, at most `max_pages` ranges.
pub fn attend_splits(blocks_without_split: usize, max_pages: usize, target_blocks: usize) -> usize {
    let want = target_blocks.div_ceil(blocks_without_split.max(1));
    want.clamp(1, max_pages.div_ceil(4).max(1))
}

// The sizes the header's structs have, asserted when the crate compiles (the emulation
// tests check them again against the compiled C++ of `cuda/rotatekv.cuh`). A class added to
// the format table grows the three structs that carry one layout per class.
const _: () = {
    use std::mem::size_of;
    const L: usize = NUM_CLASSES * 72;
    assert!(size_of::<RkvLayout>() == 72);
    assert!(size_of::<RkvPack>() == 24);
    assert!(size_of::<RkvPage>() == 24);
    assert!(size_of::<RkvSrc>() == 56);
    assert!(size_of::<RkvDst>() == 32);
    assert!(size_of::<RkvAppendParams>() == 72 + L);
    assert!(size_of::<RkvChannelParams>() == 40 + L);
    assert!(size_of::<RkvAttendParams>() == 232 + L);
    assert!(size_of::<RkvCombineParams>() == 96);
    assert!(size_of::<RkvPagedWriteParams>() == 264);
    assert!(size_of::<RkvFwhtParams>() == 40);
    assert!(size_of::<RkvMassParams>() == 112);
};
