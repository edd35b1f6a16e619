//! The one format table: the precision classes a token can be stored in, and the byte
//! layout of a block of tokens in each. Everything else (the store, persistence, the CUDA
//! ABI and header, the Python package) derives the classes from [`CLASS_BITS`].
//!
//! Adding a class (say 5 or 6 bits) means: its width in [`CLASS_BITS`], its row packing in
//! [`packed_row_bytes`], [`set_code`]/[`get_code`] and [`crate::quant`]'s pack/unpack, the
//! kernels' unpack routines (`attend.rs`, `cuda/rotatekv.cuh`), and tests.
//!
//! ## Byte layout of a block (little-endian)
//! A block holds `cap` tokens (32 or 64) of every KV head in one class: `H` head blocks of
//! `head_bytes` each, back to back (head `h` at `h * head_bytes`). A store page puts a
//! header of positions and tags in front of one block (see [`crate::page`]); a caller-owned
//! pool ([`crate::paged`]) is an array of bare blocks. `D` is the head dim, `g` the group
//! size, `b` the bits, `row(n, b)` the packed bytes of `n` codes (see [`crate::quant`]),
//! `align4`/`align8` round offsets up.
//!
//! A head block for `b < 16`, keys per token (groups of `g` channels of one token):
//!
//! | offset | size | content |
//! |---|---|---|
//! | 0 | `D * row(cap, b)` | key codes, channel-major: row `c` packs the codes of channel `c` for slots `0..cap` |
//! | `ks = align4(..)` | `2 * (D/g) * cap` | key scales, f16 `[D/g][cap]` |
//! | `ks + 2*(D/g)*cap` | same | key zeros, f16 `[D/g][cap]` |
//! | `vc = align4(..)` | `cap * row(D, b')` | value codes, token-major: row `u` packs slot `u`'s `D` codes |
//! | `vs = align4(..)` | `2 * cap * (D/g)` | value scales, f16 `[cap][D/g]` |
//! | `vs + 2*cap*(D/g)` | same | value zeros, f16 `[cap][D/g]` |
//!
//! `b'` is the value width ([`Layout::vbits`]): `b` but in a block format with separate key
//! and value widths (both below 16).
//!
//! With keys per channel (KIVI: one group per channel over the page's tokens), the key
//! scales and zeros are f16 `[D]` each; a per-channel page is written once, whole.
//!
//! For `b = 16`: key values f16/bf16 `[D][cap]` (channel-major), then at `align4` value
//! values `[cap][D]`. The head block size is rounded up to 8 bytes.
//!
//! Keys are channel-major so that attention computes the scores of all the page's tokens
//! with vector operations across tokens (no horizontal sums); values are token-major so that
//! the weighted sum runs across channels. Quantized blocks hold keys in the plan's stored
//! basis (Hadamard, then permutation) and values rotated when the plan says so; 16-bit
//! blocks hold both unrotated.
//!
//! Codes of different slots share bytes (2 bits: slots `u`, `u+cap/4`, `u+cap/2`,
//! `u+3cap/4`), so a writer of one slot must read-modify-write ([`set_code`]) and two
//! writers of one block must not run at once.

use crate::error::{Error, Result};
use crate::simd::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// The precision classes by index: bits per code (16: unquantized 16-bit floats).
pub const CLASS_BITS: [u8; 5] = [2, 3, 4, 8, 16];

/// Number of precision classes.
pub const NUM_CLASSES: usize = CLASS_BITS.len();

/// Index of a bit width among the precision classes (`None`: not a class).
pub const fn class_of(bits: u8) -> Option<usize> {
    let mut i = 0;
    while i < NUM_CLASSES {
        if CLASS_BITS[i] == bits {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Index of a class's bit width (checked widths only: see [`check_bits`]).
pub fn class_index(bits: u8) -> usize {
    class_of(bits).unwrap_or_else(|| unreachable!("class_index of unchecked bits={bits}"))
}

/// The classes as text, for messages: `"2, 3, 4, 8, 16"`.
pub fn classes_str() -> String {
    CLASS_BITS.map(|b| b.to_string()).join(", ")
}

/// Checks a bit width against the classes; the error names `arg`.
pub fn check_bits(arg: &str, bits: u8) -> Result<()> {
    match class_of(bits) {
        Some(_) => Ok(()),
        None => Err(Error::value(
            arg,
            format!("one of {}", classes_str()),
            bits.to_string(),
        )),
    }
}

/// Bytes of a packed row of `n` codes.
pub const fn packed_row_bytes(n: usize, bits: u8) -> usize {
    match bits {
        3 => n / 4 + n / 8,
        16 => 2 * n,
        b => n * b as usize / 8,
    }
}

/// Largest code of a bit width.
#[inline(always)]
pub fn max_code(bits: u8) -> u8 {
    ((1u16 << bits) - 1) as u8
}

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
    /// Bits per value code: `bits` except in a block format with separate key and value
    /// widths (both below 16, or both 16).
    pub vbits: u8,
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
    /// Offset of the tags (0 for a bare block).
    pub tag_off: usize,
    /// Offset of head 0's block (0 for a bare block).
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
    /// The layout of a store page: the positions-and-tags header, then one block (keys
    /// `bits` wide, values `vbits`).
    pub fn new(
        bits: u8,
        vbits: u8,
        per_channel: bool,
        cap: usize,
        heads: usize,
        d: usize,
        group: usize,
    ) -> Self {
        Self::with_header(true, bits, vbits, per_channel, cap, heads, d, group)
    }

    /// The layout of a bare block (no header: positions are implied by the block table),
    /// as caller-owned pools hold them ([`crate::paged`]). Keys are per token, `bits` wide;
    /// values `vbits` wide (both below 16, or both 16).
    pub fn block(bits: u8, vbits: u8, cap: usize, heads: usize, d: usize, group: usize) -> Self {
        Self::with_header(false, bits, vbits, false, cap, heads, d, group)
    }

    #[allow(clippy::too_many_arguments)]
    fn with_header(
        header: bool,
        bits: u8,
        vbits: u8,
        per_channel: bool,
        cap: usize,
        heads: usize,
        d: usize,
        group: usize,
    ) -> Self {
        debug_assert_eq!(bits == 16, vbits == 16, "16-bit keys need 16-bit values");
        let tag_off = if header { 4 * cap } else { 0 };
        let head_off = if header { align(tag_off + cap, 8) } else { 0 };
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
            v_row = packed_row_bytes(d, vbits);
            v_scale = align(v_codes + cap * v_row, 4);
            v_zero = v_scale + 2 * cap * ng;
            end = v_zero + 2 * cap * ng;
        }
        let head_bytes = align(end, 8);
        Layout {
            bits,
            vbits,
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
        let header = if self.head_off > 0 { 5.0 } else { 0.0 };
        self.block_bytes() as f64 / self.cap as f64 + header
    }

    /// Bytes of the heads' blocks (the page less its header).
    pub fn block_bytes(&self) -> usize {
        self.total - self.head_off
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_offsets_match_the_documented_table() {
        // 2 bits, cap 64, 8 heads of 128, group 128 (the benchmark shape).
        let l = Layout::new(2, 2, false, 64, 8, 128, 128);
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
        let l = Layout::new(16, 16, false, 32, 3, 64, 64);
        assert_eq!(l.v_codes, 64 * 64);
        assert_eq!(l.head_bytes, 2 * 64 * 32 * 2);
        // Per-channel keys: scale and zero per channel.
        let l = Layout::new(2, 2, true, 32, 1, 64, 32);
        assert_eq!(l.k_row, 8);
        assert_eq!(l.k_zero - l.k_scale, 128);
        assert_eq!(l.v_codes, 512 + 256);
        // A bare block: the page less its header, same head blocks.
        let p = Layout::new(2, 2, false, 64, 8, 128, 128);
        let b = Layout::block(2, 2, 64, 8, 128, 128);
        assert_eq!((b.head_off, b.tag_off), (0, 0));
        assert_eq!(b.total, p.total - p.head_off);
        assert_eq!(
            (b.head_bytes, b.v_codes, b.k_zero),
            (p.head_bytes, p.v_codes, p.k_zero)
        );
        assert_eq!(b.head(3), p.head(3) - p.head_off);
        // Keys 4 bits, values 2: the key part of a 4-bit block, the value rows of a 2-bit one.
        let a = Layout::block(4, 2, 64, 8, 128, 128);
        let (k4, v2) = (Layout::block(4, 4, 64, 8, 128, 128), b);
        assert_eq!(
            (a.k_row, a.k_scale, a.v_codes),
            (k4.k_row, k4.k_scale, k4.v_codes)
        );
        assert_eq!(a.v_row, v2.v_row);
        assert_eq!(a.v_scale - a.v_codes, v2.v_scale - v2.v_codes);
        assert_eq!(a.head_bytes, 128 * 64 / 2 + 256 + 64 * 128 / 4 + 256);
    }

    #[test]
    fn class_table_is_the_one_source() {
        for (i, &b) in CLASS_BITS.iter().enumerate() {
            assert_eq!(class_of(b), Some(i));
            assert!(check_bits("bits", b).is_ok());
        }
        for b in [0u8, 1, 5, 6, 7, 9, 15, 17, 255] {
            assert_eq!(class_of(b), None);
            let e = check_bits("bits", b).unwrap_err().to_string();
            assert!(e.contains("bits") && e.contains(&classes_str()), "{e}");
        }
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
