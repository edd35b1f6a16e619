//! Pages: the store's own blocks. A page is a header (positions and tags of its slots)
//! followed by one block of `cap` tokens of one layer and one sequence, in one precision
//! class, for every KV head ([`crate::format`] documents the block byte by byte). A sequence
//! grows by adding pages; old pages are never copied.
//!
//! ## Byte layout of the header (little-endian)
//!
//! | offset | size | content |
//! |---|---|---|
//! | 0 | `4*cap` | token positions, i32 per slot |
//! | `4*cap` | `cap` | tags, u8 per slot (target bits of a token waiting in the recent window) |
//! | `head_off = align8(5*cap)` | `H * head_bytes` | the block |
//!
//! Kernels read pages through [`PageView`], the descriptor that caller-owned pools
//! ([`crate::paged`]) also produce, so the store and a serving engine share one attention
//! kernel. The writers here fill slots of a block in any byte buffer.

use std::sync::Arc;

use crate::device::{DevBuf, DeviceMemory};
use crate::error::Result;
use crate::format::{get_code, max_code, set_code, FpFormat, Layout};
use crate::quant::{code_of, group_params, pack_row};
use crate::simd::f16_to_f32;

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
    pub fn new_device(lay: &Layout, backend: Arc<dyn DeviceMemory>) -> Result<Self> {
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
    pub fn to_device(&self, lay: &Layout, backend: Arc<dyn DeviceMemory>) -> Result<Self> {
        let host = self.to_host(lay)?;
        let dev = DevBuf::new(backend.clone(), lay.total)?;
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

    /// What kernels read of this page (a host page).
    pub fn view<'a>(&'a self, lay: &'a Layout) -> PageView<'a> {
        PageView {
            bytes: self.bytes(),
            lay,
            pos: Positions::Slots(self.positions()),
            start: self.start,
            len: self.len,
            min_pos: self.min_pos,
            max_pos: self.max_pos,
        }
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

/// Where the tokens of a block sit in their sequence.
#[derive(Clone, Copy, Debug)]
pub enum Positions<'a> {
    /// One position per slot (a store page's header).
    Slots(&'a [i32]),
    /// Slot `u` holds position `first + u` (a block of a block table).
    From(i32),
}

impl Positions<'_> {
    /// Every slot's position.
    #[inline(always)]
    pub fn all<const CAP: usize>(&self) -> [i32; CAP] {
        match self {
            Positions::Slots(p) => p[..CAP].try_into().expect("CAP positions"),
            Positions::From(f) => std::array::from_fn(|u| f + u as i32),
        }
    }
}

/// A block as kernels read it: its bytes (the layout's offsets are relative to them), the
/// live slots `start..len` and their positions. Store pages and caller-owned pools both
/// give these, so there is one attention kernel for both.
#[derive(Clone, Copy, Debug)]
pub struct PageView<'a> {
    /// The bytes the layout describes.
    pub bytes: &'a [u8],
    /// The block's format (its class is `lay.bits`; values are `lay.vbits` wide).
    pub lay: &'a Layout,
    /// Positions of the slots.
    pub pos: Positions<'a>,
    /// First live slot.
    pub start: usize,
    /// One past the last live slot.
    pub len: usize,
    /// Smallest live position.
    pub min_pos: i32,
    /// Largest live position.
    pub max_pos: i32,
}

impl PageView<'_> {
    /// `n` u16 values at byte offset `off`.
    #[inline(always)]
    pub fn u16s(&self, off: usize, n: usize) -> &[u16] {
        bytemuck::cast_slice(&self.bytes[off..off + 2 * n])
    }
}

/// Tokens to write: keys channel-major `[H*D][n]`, values token-major `[n][H*D]`, in the
/// basis the block stores.
pub struct Chunk<'a> {
    /// Keys, `[H*D][n]`.
    pub keys: &'a [f32],
    /// Values, `[n][H*D]`.
    pub values: &'a [f32],
    /// Tokens.
    pub n: usize,
}

impl Chunk<'_> {
    /// Tokens in the chunk.
    pub fn n(&self) -> usize {
        self.n
    }
}

fn u16s_mut(bytes: &mut [u8], off: usize, n: usize) -> &mut [u16] {
    bytemuck::cast_slice_mut(&mut bytes[off..off + 2 * n])
}

/// Writes unquantized tokens into slots `u0..u0+n` of the block in `bytes`.
pub fn write_fp(bytes: &mut [u8], lay: &Layout, u0: usize, c: &Chunk, fmt: FpFormat) {
    let n = c.n();
    let (cap, d) = (lay.cap, lay.d);
    let hd = lay.heads * d;
    for h in 0..lay.heads {
        let base = lay.head(h);
        let keys = u16s_mut(bytes, base, d * cap);
        for ch in 0..d {
            let src = &c.keys[(h * d + ch) * n..(h * d + ch + 1) * n];
            for (t, v) in src.iter().enumerate() {
                keys[ch * cap + u0 + t] = fmt.encode(*v);
            }
        }
        let vals = u16s_mut(bytes, base + lay.v_codes, cap * d);
        for t in 0..n {
            let src = &c.values[t * hd + h * d..t * hd + (h + 1) * d];
            for (o, v) in vals[(u0 + t) * d..(u0 + t + 1) * d].iter_mut().zip(src) {
                *o = fmt.encode(*v);
            }
        }
    }
}

fn write_values(bytes: &mut [u8], lay: &Layout, u0: usize, c: &Chunk, clip: f32) {
    let n = c.n();
    let (d, g, bits) = (lay.d, lay.group, lay.vbits);
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
            pack_row(&codes, bits, &mut bytes[off..off + lay.v_row]);
            let sc = u16s_mut(bytes, base + lay.v_scale, lay.cap * ng);
            for (gi, (s, _)) in sz.iter().enumerate() {
                sc[(u0 + t) * ng + gi] = *s;
            }
            let zr = u16s_mut(bytes, base + lay.v_zero, lay.cap * ng);
            for (gi, (_, z)) in sz.iter().enumerate() {
                zr[(u0 + t) * ng + gi] = *z;
            }
        }
    }
}

/// Writes tokens quantized per token (keys in groups of `group` channels of one token) into
/// slots `u0..u0+n` of the block in `bytes`; other slots' codes are kept.
pub fn write_quant_per_token(
    bytes: &mut [u8],
    lay: &Layout,
    u0: usize,
    c: &Chunk,
    kclip: f32,
    vclip: f32,
) {
    debug_assert!(!lay.per_channel && lay.bits < 16);
    let n = c.n();
    let (cap, d, g, bits) = (lay.cap, lay.d, lay.group, lay.bits);
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
                u16s_mut(bytes, base + lay.k_scale, ng * cap)[gi * cap + u0 + t] = s;
                u16s_mut(bytes, base + lay.k_zero, ng * cap)[gi * cap + u0 + t] = z;
                sf[t] = f16_to_f32(s);
                zf[t] = f16_to_f32(z);
            }
            for ch in gi * g..(gi + 1) * g {
                let src = &c.keys[(h * d + ch) * n..(h * d + ch + 1) * n];
                let off = base + ch * lay.k_row;
                let row = &mut bytes[off..off + lay.k_row];
                for t in 0..n {
                    set_code(row, bits, cap, u0 + t, code_of(src[t], sf[t], zf[t], maxc));
                }
            }
        }
    }
    write_values(bytes, lay, u0, c, vclip);
}

/// Writes a whole block of tokens with keys quantized per channel (slots from 0).
pub fn write_quant_per_channel(bytes: &mut [u8], lay: &Layout, c: &Chunk, kclip: f32, vclip: f32) {
    debug_assert!(lay.per_channel && lay.bits < 16);
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
            u16s_mut(bytes, base + lay.k_scale, d)[ch] = s;
            u16s_mut(bytes, base + lay.k_zero, d)[ch] = z;
            let (sf, zf) = (f16_to_f32(s), f16_to_f32(z));
            let off = base + ch * lay.k_row;
            let row = &mut bytes[off..off + lay.k_row];
            for (t, v) in src.iter().enumerate() {
                set_code(row, bits, cap, t, code_of(*v, sf, zf, maxc));
            }
        }
    }
    write_values(bytes, lay, 0, c, vclip);
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
