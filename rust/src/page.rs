//! Pages: fixed-capacity blocks of tokens of one sequence and one layer, in one precision
//! class, for every KV head. A sequence grows by adding pages; old pages are never copied.
//!
//! ## Byte layout of a page (little-endian)
//! `cap` is the page capacity in tokens (32 or 64), `H` the KV heads, `D` the head dim, `g`
//! the group size, `b` the bits, `row(n, b)` the packed bytes of `n` codes (see
//! [`crate::quant`]), `align4`/`align8` round offsets up.
//!
//! | offset | size | content |
//! |---|---|---|
//! | 0 | `4*cap` | token positions, i32 per slot |
//! | `4*cap` | `cap` | tags, u8 per slot (target bits of a token waiting in the recent window) |
//! | `head_off = align8(5*cap)` | `H * head_bytes` | one block per KV head |
//!
//! A head block for `b < 16`, keys per token (groups of `g` channels of one token):
//!
//! | offset | size | content |
//! |---|---|---|
//! | 0 | `D * row(cap, b)` | key codes, channel-major: row `c` packs the codes of channel `c` for slots `0..cap` |
//! | `ks = align4(..)` | `2 * (D/g) * cap` | key scales, f16 `[D/g][cap]` |
//! | `ks + 2*(D/g)*cap` | same | key zeros, f16 `[D/g][cap]` |
//! | `vc = align4(..)` | `cap * row(D, b)` | value codes, token-major: row `u` packs slot `u`'s `D` codes |
//! | `vs = align4(..)` | `2 * cap * (D/g)` | value scales, f16 `[cap][D/g]` |
//! | `vs + 2*cap*(D/g)` | same | value zeros, f16 `[cap][D/g]` |
//!
//! With keys per channel (KIVI: one group per channel over the page's tokens), the key
//! scales and zeros are f16 `[D]` each; a per-channel page is written once, whole.
//!
//! For `b = 16`: key values f16/bf16 `[D][cap]` (channel-major), then at `align4` value
//! values `[cap][D]`. The head block size is rounded up to 8 bytes.
//!
//! Keys are channel-major so that attention computes the scores of all the page's tokens
//! with vector operations across tokens (no horizontal sums); values are token-major so that
//! the weighted sum runs across channels. Quantized pages hold keys in the plan's stored
//! basis (Hadamard, then permutation) and values rotated when the plan says so; 16-bit pages
//! hold both unrotated.

use std::sync::Arc;

use crate::cuda::backend::{Backend, DevBuf};
use crate::error::Result;
use crate::quant::{code_of, group_params, max_code, pack_row, packed_row_bytes};
use crate::simd::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// The 16-bit float format of unquantized tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FpFormat {
    /// IEEE binary16.
    F16,
    /// bfloat16 (wider range, for models with large activations).
    BF16,
}

impl FpFormat {
    /// 16-bit pattern of an f32.
    #[inline(always)]
    pub fn encode(self, x: f32) -> u16 {
        match self {
            FpFormat::F16 => f32_to_f16(x),
            FpFormat::BF16 => f32_to_bf16(x),
        }
    }
    /// f32 of a 16-bit pattern.
    #[inline(always)]
    pub fn decode(self, h: u16) -> f32 {
        match self {
            FpFormat::F16 => f16_to_f32(h),
            FpFormat::BF16 => bf16_to_f32(h),
        }
    }
    /// Rounds an f32 through this format.
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        self.decode(self.encode(x))
    }
    /// Name used in Python and files.
    pub fn as_str(self) -> &'static str {
        match self {
            FpFormat::F16 => "float16",
            FpFormat::BF16 => "bfloat16",
        }
    }
}

const fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Offsets of one page format (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Bits per code (16: unquantized).
    pub bits: u8,
    /// Keys quantized per channel over the page's tokens.
    pub per_channel: bool,
    /// Capacity in tokens.
    pub cap: usize,
    /// KV heads.
    pub heads: usize,
    /// Head dim.
    pub d: usize,
    /// Channels per quantization group.
    pub group: usize,
    /// Offset of the tags.
    pub tag_off: usize,
    /// Offset of head 0's block.
    pub head_off: usize,
    /// Bytes per head block.
    pub head_bytes: usize,
    /// Bytes of one key code row (one channel).
    pub k_row: usize,
    /// Key scales, relative to the head block.
    pub k_scale: usize,
    /// Key zeros, relative to the head block.
    pub k_zero: usize,
    /// Value codes, relative to the head block.
    pub v_codes: usize,
    /// Bytes of one value code row (one token).
    pub v_row: usize,
    /// Value scales, relative to the head block.
    pub v_scale: usize,
    /// Value zeros, relative to the head block.
    pub v_zero: usize,
    /// Total page bytes (a multiple of 8).
    pub total: usize,
}

impl Layout {
    /// The layout of a page format.
    pub fn new(
        bits: u8,
        per_channel: bool,
        cap: usize,
        heads: usize,
        d: usize,
        group: usize,
    ) -> Self {
        let tag_off = 4 * cap;
        let head_off = align(tag_off + cap, 8);
        let ng = d / group;
        let (k_row, k_scale, k_zero, v_codes, v_row, v_scale, v_zero, end);
        if bits == 16 {
            k_row = 2 * cap;
            k_scale = d * k_row;
            k_zero = k_scale;
            v_codes = align(d * k_row, 4);
            v_row = 2 * d;
            v_scale = v_codes + cap * v_row;
            v_zero = v_scale;
            end = v_zero;
        } else {
            k_row = packed_row_bytes(cap, bits);
            k_scale = align(d * k_row, 4);
            let ks_len = if per_channel { d } else { ng * cap };
            k_zero = k_scale + 2 * ks_len;
            v_codes = align(k_zero + 2 * ks_len, 4);
            v_row = packed_row_bytes(d, bits);
            v_scale = align(v_codes + cap * v_row, 4);
            v_zero = v_scale + 2 * cap * ng;
            end = v_zero + 2 * cap * ng;
        }
        let head_bytes = align(end, 8);
        Layout {
            bits,
            per_channel,
            cap,
            heads,
            d,
            group,
            tag_off,
            head_off,
            head_bytes,
            k_row,
            k_scale,
            k_zero,
            v_codes,
            v_row,
            v_scale,
            v_zero,
            total: head_off + heads * head_bytes,
        }
    }

    /// Start of head `h`'s block.
    #[inline(always)]
    pub fn head(&self, h: usize) -> usize {
        self.head_off + h * self.head_bytes
    }

    /// Bytes of one token's data (codes, scales, zeros, position and tag) over all heads:
    /// what the token costs, not counting page slack.
    pub fn token_payload_bytes(&self) -> f64 {
        (self.total - self.head_off) as f64 / self.cap as f64 + 5.0
    }
}

/// One page.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    /// Bits per code (16: unquantized).
    pub bits: u8,
    /// Capacity in tokens.
    pub cap: usize,
    /// First live slot (the recent window drains pages from the front).
    pub start: usize,
    /// One past the last written slot.
    pub len: usize,
    /// Closed pages take no more tokens (per-channel pages are written whole).
    pub closed: bool,
    /// Smallest live position.
    pub min_pos: i32,
    /// Largest live position.
    pub max_pos: i32,
    /// Host bytes: the whole page, or for a device page a mirror of its positions and tags
    /// (the first `head_off` bytes), which the store's bookkeeping reads.
    data: Vec<u64>,
    /// The page's memory on a device (`None`: a host page).
    pub dev: Option<DevBuf>,
}

impl Page {
    /// An empty page.
    pub fn new(lay: &Layout) -> Self {
        Page {
            bits: lay.bits,
            cap: lay.cap,
            start: 0,
            len: 0,
            closed: false,
            min_pos: i32::MAX,
            max_pos: i32::MIN,
            data: vec![0u64; lay.total / 8],
            dev: None,
        }
    }

    /// An empty page in device memory (zeroed).
    pub fn new_device(lay: &Layout, backend: &Arc<dyn Backend>) -> Result<Self> {
        let mut p = Page::new(lay);
        p.data = vec![0u64; lay.head_off / 8];
        p.dev = Some(DevBuf::new(backend, lay.total)?);
        Ok(p)
    }

    /// Device address of a device page (0 for a host page).
    pub fn dev_ptr(&self) -> u64 {
        self.dev.as_ref().map_or(0, |d| d.ptr)
    }

    /// This page with its bytes on the host (a copy).
    pub fn to_host(&self, lay: &Layout) -> Result<Self> {
        let Some(d) = &self.dev else {
            return Ok(self.clone());
        };
        let mut p = Page {
            data: vec![0u64; lay.total / 8],
            dev: None,
            ..self.clone_meta()
        };
        d.backend.d2h(p.bytes_mut(), d.ptr)?;
        Ok(p)
    }

    /// This page with its bytes on `backend` (a copy).
    pub fn to_device(&self, lay: &Layout, backend: &Arc<dyn Backend>) -> Result<Self> {
        let host = self.to_host(lay)?;
        let dev = DevBuf::new(backend, lay.total)?;
        backend.h2d(dev.ptr, host.bytes())?;
        Ok(Page {
            data: host.data[..lay.head_off / 8].to_vec(),
            dev: Some(dev),
            ..self.clone_meta()
        })
    }

    /// This host page's bookkeeping with only its header bytes (positions and tags): the
    /// host mirror a device page keeps.
    pub fn header_copy(&self, lay: &Layout) -> Self {
        Page {
            data: self.data[..lay.head_off / 8].to_vec(),
            ..self.clone_meta()
        }
    }

    fn clone_meta(&self) -> Self {
        Page {
            bits: self.bits,
            cap: self.cap,
            start: self.start,
            len: self.len,
            closed: self.closed,
            min_pos: self.min_pos,
            max_pos: self.max_pos,
            data: Vec::new(),
            dev: None,
        }
    }

    /// A page from saved bytes (lengths checked by the caller).
    pub fn from_bytes(lay: &Layout, bytes: &[u8]) -> Self {
        let mut p = Page::new(lay);
        p.bytes_mut().copy_from_slice(bytes);
        p
    }

    /// Live tokens.
    pub fn live(&self) -> usize {
        self.len - self.start
    }

    /// Whether more tokens fit.
    pub fn has_room(&self) -> bool {
        !self.closed && self.len < self.cap
    }

    /// Allocated bytes.
    pub fn nbytes(&self) -> usize {
        self.dev.as_ref().map_or(self.data.len() * 8, |d| d.bytes)
    }

    /// The raw bytes.
    pub fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.data)
    }

    /// The raw bytes, mutable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.data)
    }

    /// Positions of all slots.
    pub fn positions(&self) -> &[i32] {
        bytemuck::cast_slice(&self.bytes()[..4 * self.cap])
    }

    /// Tags of all slots.
    pub fn tags(&self) -> &[u8] {
        &self.bytes()[4 * self.cap..5 * self.cap]
    }

    /// `n` u16 values at byte offset `off`.
    #[inline(always)]
    pub fn u16s(&self, off: usize, n: usize) -> &[u16] {
        bytemuck::cast_slice(&self.bytes()[off..off + 2 * n])
    }

    fn u16s_mut(&mut self, off: usize, n: usize) -> &mut [u16] {
        bytemuck::cast_slice_mut(&mut self.bytes_mut()[off..off + 2 * n])
    }

    /// Recomputes `min_pos`/`max_pos` over live slots.
    pub fn refresh_range(&mut self) {
        let (mut lo, mut hi) = (i32::MAX, i32::MIN);
        for &p in &self.positions()[self.start..self.len] {
            lo = lo.min(p);
            hi = hi.max(p);
        }
        self.min_pos = lo;
        self.max_pos = hi;
    }

    /// Records `pos` and `tags` in the next slots (the data is written by the caller).
    pub fn write_meta(&mut self, pos: &[i32], tags: &[u8]) {
        let (u0, cap) = (self.len, self.cap);
        let n = pos.len();
        let b = self.bytes_mut();
        let p: &mut [i32] = bytemuck::cast_slice_mut(&mut b[..4 * cap]);
        p[u0..u0 + n].copy_from_slice(pos);
        b[4 * cap + u0..4 * cap + u0 + n].copy_from_slice(tags);
        for &x in pos {
            self.min_pos = self.min_pos.min(x);
            self.max_pos = self.max_pos.max(x);
        }
        self.len += n;
    }
}

/// Tokens to write: keys channel-major `[H*D][n]`, values token-major `[n][H*D]`, in the
/// basis the page stores.
pub struct Chunk<'a> {
    /// Keys, `[H*D][n]`.
    pub keys: &'a [f32],
    /// Values, `[n][H*D]`.
    pub values: &'a [f32],
    /// Positions, `[n]`.
    pub pos: &'a [i32],
    /// Tags, `[n]`.
    pub tags: &'a [u8],
}

impl Chunk<'_> {
    /// Tokens in the chunk.
    pub fn n(&self) -> usize {
        self.pos.len()
    }
}

/// Sets code `u` of a packed row of `cap` codes.
#[inline]
pub fn set_code(row: &mut [u8], bits: u8, cap: usize, u: usize, code: u8) {
    match bits {
        8 => row[u] = code,
        4 => {
            let q = cap / 2;
            let sh = 4 * (u / q);
            row[u % q] = (row[u % q] & !(15 << sh)) | (code << sh);
        }
        2 => {
            let q = cap / 4;
            let sh = 2 * (u / q);
            row[u % q] = (row[u % q] & !(3 << sh)) | ((code & 3) << sh);
        }
        3 => {
            set_code(row, 2, cap, u, code & 3);
            let q = cap / 8;
            let sh = u / q;
            let b = &mut row[cap / 4 + u % q];
            *b = (*b & !(1 << sh)) | (((code >> 2) & 1) << sh);
        }
        _ => unreachable!("set_code bits={bits}"),
    }
}

/// Code `u` of a packed row of `cap` codes.
#[inline]
pub fn get_code(row: &[u8], bits: u8, cap: usize, u: usize) -> u8 {
    match bits {
        8 => row[u],
        4 => (row[u % (cap / 2)] >> (4 * (u / (cap / 2)))) & 15,
        2 => (row[u % (cap / 4)] >> (2 * (u / (cap / 4)))) & 3,
        3 => {
            let q = cap / 8;
            get_code(row, 2, cap, u) | (((row[cap / 4 + u % q] >> (u / q)) & 1) << 2)
        }
        _ => unreachable!("get_code bits={bits}"),
    }
}

/// Appends unquantized tokens.
pub fn write_fp(page: &mut Page, lay: &Layout, c: &Chunk, fmt: FpFormat) {
    let n = c.n();
    let (u0, cap, d) = (page.len, lay.cap, lay.d);
    let hd = lay.heads * d;
    for h in 0..lay.heads {
        let base = lay.head(h);
        let keys = page.u16s_mut(base, d * cap);
        for ch in 0..d {
            let src = &c.keys[(h * d + ch) * n..(h * d + ch + 1) * n];
            for (t, v) in src.iter().enumerate() {
                keys[ch * cap + u0 + t] = fmt.encode(*v);
            }
        }
        let vals = page.u16s_mut(base + lay.v_codes, cap * d);
        for t in 0..n {
            let src = &c.values[t * hd + h * d..t * hd + (h + 1) * d];
            for (o, v) in vals[(u0 + t) * d..(u0 + t + 1) * d].iter_mut().zip(src) {
                *o = fmt.encode(*v);
            }
        }
    }
    page.write_meta(c.pos, c.tags);
}

fn write_values(page: &mut Page, lay: &Layout, c: &Chunk, clip: f32) {
    let n = c.n();
    let (u0, d, g, bits) = (page.len, lay.d, lay.group, lay.bits);
    let (hd, ng, maxc) = (lay.heads * d, d / g, max_code(bits) as f32);
    let mut codes = vec![0u8; d];
    for h in 0..lay.heads {
        let base = lay.head(h);
        for t in 0..n {
            let row = &c.values[t * hd + h * d..t * hd + (h + 1) * d];
            let mut sz = vec![(0u16, 0u16); ng];
            for (gi, grp) in row.chunks_exact(g).enumerate() {
                let mn = grp.iter().copied().fold(f32::INFINITY, f32::min);
                let mx = grp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (s, z) = group_params(mn, mx, bits, clip);
                let (sf, zf) = (f16_to_f32(s), f16_to_f32(z));
                for (o, v) in codes[gi * g..(gi + 1) * g].iter_mut().zip(grp) {
                    *o = code_of(*v, sf, zf, maxc);
                }
                sz[gi] = (s, z);
            }
            let off = base + lay.v_codes + (u0 + t) * lay.v_row;
            pack_row(&codes, bits, &mut page.bytes_mut()[off..off + lay.v_row]);
            let sc = page.u16s_mut(base + lay.v_scale, lay.cap * ng);
            for (gi, (s, _)) in sz.iter().enumerate() {
                sc[(u0 + t) * ng + gi] = *s;
            }
            let zr = page.u16s_mut(base + lay.v_zero, lay.cap * ng);
            for (gi, (_, z)) in sz.iter().enumerate() {
                zr[(u0 + t) * ng + gi] = *z;
            }
        }
    }
}

/// Appends tokens quantized per token (keys in groups of `group` channels of one token).
pub fn write_quant_per_token(page: &mut Page, lay: &Layout, c: &Chunk, kclip: f32, vclip: f32) {
    debug_assert!(!lay.per_channel && lay.bits < 16);
    let n = c.n();
    let (u0, cap, d, g, bits) = (page.len, lay.cap, lay.d, lay.group, lay.bits);
    let (ng, maxc) = (d / g, max_code(bits) as f32);
    let mut mn = vec![0f32; n];
    let mut mx = vec![0f32; n];
    let mut sf = vec![0f32; n];
    let mut zf = vec![0f32; n];
    for h in 0..lay.heads {
        let base = lay.head(h);
        for gi in 0..ng {
            mn.fill(f32::INFINITY);
            mx.fill(f32::NEG_INFINITY);
            for ch in gi * g..(gi + 1) * g {
                let src = &c.keys[(h * d + ch) * n..(h * d + ch + 1) * n];
                for t in 0..n {
                    mn[t] = mn[t].min(src[t]);
                    mx[t] = mx[t].max(src[t]);
                }
            }
            for t in 0..n {
                let (s, z) = group_params(mn[t], mx[t], bits, kclip);
                page.u16s_mut(base + lay.k_scale, ng * cap)[gi * cap + u0 + t] = s;
                page.u16s_mut(base + lay.k_zero, ng * cap)[gi * cap + u0 + t] = z;
                sf[t] = f16_to_f32(s);
                zf[t] = f16_to_f32(z);
            }
            for ch in gi * g..(gi + 1) * g {
                let src = &c.keys[(h * d + ch) * n..(h * d + ch + 1) * n];
                let off = base + ch * lay.k_row;
                let row = &mut page.bytes_mut()[off..off + lay.k_row];
                for t in 0..n {
                    set_code(row, bits, cap, u0 + t, code_of(src[t], sf[t], zf[t], maxc));
                }
            }
        }
    }
    write_values(page, lay, c, vclip);
    page.write_meta(c.pos, c.tags);
}

/// Writes a whole block of tokens with keys quantized per channel; closes the page.
pub fn write_quant_per_channel(page: &mut Page, lay: &Layout, c: &Chunk, kclip: f32, vclip: f32) {
    debug_assert!(lay.per_channel && lay.bits < 16 && page.len == 0);
    let n = c.n();
    let (cap, d, bits) = (lay.cap, lay.d, lay.bits);
    let maxc = max_code(bits) as f32;
    for h in 0..lay.heads {
        let base = lay.head(h);
        for ch in 0..d {
            let src = &c.keys[(h * d + ch) * n..(h * d + ch + 1) * n];
            let mn = src.iter().copied().fold(f32::INFINITY, f32::min);
            let mx = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (s, z) = group_params(mn, mx, bits, kclip);
            page.u16s_mut(base + lay.k_scale, d)[ch] = s;
            page.u16s_mut(base + lay.k_zero, d)[ch] = z;
            let (sf, zf) = (f16_to_f32(s), f16_to_f32(z));
            let off = base + ch * lay.k_row;
            let row = &mut page.bytes_mut()[off..off + lay.k_row];
            for (t, v) in src.iter().enumerate() {
                set_code(row, bits, cap, t, code_of(*v, sf, zf, maxc));
            }
        }
    }
    write_values(page, lay, c, vclip);
    page.write_meta(c.pos, c.tags);
    page.closed = true;
}

/// Copies slot `from` to slot `to` (`to < from`), every head (used to compact a page).
pub fn move_slot(page: &mut Page, lay: &Layout, from: usize, to: usize) {
    let (cap, d) = (lay.cap, lay.d);
    let pos = page.positions()[from];
    let tag = page.tags()[from];
    {
        let b = page.bytes_mut();
        let p: &mut [i32] = bytemuck::cast_slice_mut(&mut b[..4 * cap]);
        p[to] = pos;
        b[4 * cap + to] = tag;
    }
    for h in 0..lay.heads {
        let base = lay.head(h);
        if lay.bits == 16 {
            let k = page.u16s_mut(base, d * cap);
            for ch in 0..d {
                k[ch * cap + to] = k[ch * cap + from];
            }
            let v = page.u16s_mut(base + lay.v_codes, cap * d);
            v.copy_within(from * d..(from + 1) * d, to * d);
            continue;
        }
        for ch in 0..d {
            let off = base + ch * lay.k_row;
            let row = &mut page.bytes_mut()[off..off + lay.k_row];
            let code = get_code(row, lay.bits, cap, from);
            set_code(row, lay.bits, cap, to, code);
        }
        if !lay.per_channel {
            let ng = d / lay.group;
            for off in [lay.k_scale, lay.k_zero] {
                let s = page.u16s_mut(base + off, ng * cap);
                for gi in 0..ng {
                    s[gi * cap + to] = s[gi * cap + from];
                }
            }
        }
        let vr = lay.v_row;
        let vc = base + lay.v_codes;
        page.bytes_mut()
            .copy_within(vc + from * vr..vc + (from + 1) * vr, vc + to * vr);
        let ng = d / lay.group;
        for off in [lay.v_scale, lay.v_zero] {
            let s = page.u16s_mut(base + off, cap * ng);
            s.copy_within(from * ng..(from + 1) * ng, to * ng);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_offsets_match_the_documented_table() {
        // 2 bits, cap 64, 8 heads of 128, group 128 (the benchmark shape).
        let l = Layout::new(2, false, 64, 8, 128, 128);
        assert_eq!(l.tag_off, 256);
        assert_eq!(l.head_off, 320);
        assert_eq!(l.k_row, 16);
        assert_eq!(l.k_scale, 128 * 16);
        assert_eq!(l.k_zero, 2048 + 2 * 64);
        assert_eq!(l.v_codes, 2048 + 256);
        assert_eq!(l.v_row, 32);
        assert_eq!(l.v_scale, 2304 + 64 * 32);
        assert_eq!(l.v_zero, 4352 + 128);
        assert_eq!(l.head_bytes, 4608);
        assert_eq!(l.total, 320 + 8 * 4608);
        // Codes + scales + zeros: (2 + 32/128) bits per element; + 5 bytes per token.
        let bits = l.token_payload_bytes() * 8.0 / (8.0 * 128.0 * 2.0);
        assert!((bits - (2.25 + 40.0 / 2048.0)).abs() < 1e-9, "{bits}");
        // 16 bits: keys [D][cap], values [cap][D].
        let l = Layout::new(16, false, 32, 3, 64, 64);
        assert_eq!(l.v_codes, 64 * 64);
        assert_eq!(l.head_bytes, 2 * 64 * 32 * 2);
        // Per-channel keys: scale and zero per channel.
        let l = Layout::new(2, true, 32, 1, 64, 32);
        assert_eq!(l.k_row, 8);
        assert_eq!(l.k_zero - l.k_scale, 128);
        assert_eq!(l.v_codes, 512 + 256);
    }

    #[test]
    fn set_get_code_all_slots() {
        for bits in [2u8, 3, 4, 8] {
            for cap in [32usize, 64] {
                let mut row = vec![0u8; packed_row_bytes(cap, bits)];
                let codes: Vec<u8> = (0..cap)
                    .map(|u| ((u * 7 + 3) % (1 << bits)) as u8)
                    .collect();
                for (u, c) in codes.iter().enumerate().rev() {
                    set_code(&mut row, bits, cap, u, *c);
                }
                let mut back = vec![0u8; cap];
                crate::quant::unpack_row(&row, bits, &mut back);
                assert_eq!(back, codes, "bits {bits} cap {cap}");
                for (u, c) in codes.iter().enumerate() {
                    assert_eq!(get_code(&row, bits, cap, u), *c);
                }
                // Overwriting clears old bits.
                set_code(&mut row, bits, cap, 5, 0);
                assert_eq!(get_code(&row, bits, cap, 5), 0);
            }
        }
    }
}
