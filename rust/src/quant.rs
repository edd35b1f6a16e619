//! Quantization formats: asymmetric uniform integers of 2, 3, 4 and 8 bits with an fp16 scale
//! and an fp16 zero per group, and the bit packing of a row of codes.
//!
//! ## Quantizing a group
//! For a group `x[0..g]`, clip ratio `c` and `L = 2^bits - 1`:
//! `lo = c * min(x)`, `hi = c * max(x)`, `scale = f16((hi - lo) / L)`, `zero = f16(lo)` (both
//! rounded to nearest even and saturated to ±65504), then
//! `code = clamp(round_half_even((x - zero) / scale), 0, L)` computed in f32 with the stored
//! (rounded) scale and zero, and `code = 0` when `scale == 0`. Dequantization is
//! `code * scale + zero`. [`quantize_group_ref`] is the plain reference every optimized path
//! is tested against.
//!
//! ## Packing a row of n codes (`n % 8 == 0`)
//! * 8 bits: byte `j` is code `j`.
//! * 4 bits: `n/2` bytes; byte `j` holds code `j` in bits 0-3 and code `j + n/2` in bits 4-7.
//! * 2 bits: `n/4` bytes; byte `j` holds code `j + s*n/4` in bits `2s..2s+2`, `s = 0..4`.
//! * 3 bits: the low two bits of every code packed as a 2-bit row (`n/4` bytes), then a bit
//!   plane of `n/8` bytes where bit `s` of byte `j` is bit 2 of code `j + s*n/8`.
//!
//! Codes that belong together in SIMD registers (`j`, `j+1`, ...) sit in consecutive bytes,
//! so a row unpacks with shifts and masks only (no shuffles).

use crate::format::{max_code, packed_row_bytes};
use crate::simd::{f16_to_f32, f32_to_f16, madd};

/// Scale and zero (f16 bits) for a group with the given extremes.
#[inline(always)]
pub fn group_params(min: f32, max: f32, bits: u8, clip: f32) -> (u16, u16) {
    let lo = (min * clip).clamp(-65504.0, 65504.0);
    let hi = (max * clip).clamp(-65504.0, 65504.0);
    let scale = ((hi - lo) / max_code(bits) as f32).min(65504.0);
    (f32_to_f16(scale), f32_to_f16(lo))
}

/// The code of one value given the stored scale and zero (as f32).
#[inline(always)]
pub fn code_of(x: f32, scale: f32, zero: f32, maxc: f32) -> u8 {
    if scale == 0.0 {
        return 0;
    }
    // NaN (never passed: inputs are checked) would map to 0 through `max`.
    ((x - zero) / scale).round_ties_even().max(0.0).min(maxc) as u8
}

/// Reference quantizer of one group: codes, scale bits, zero bits.
pub fn quantize_group_ref(x: &[f32], bits: u8, clip: f32) -> (Vec<u8>, u16, u16) {
    let mn = x.iter().copied().fold(f32::INFINITY, f32::min);
    let mx = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (s, z) = group_params(mn, mx, bits, clip);
    let (sf, zf) = (f16_to_f32(s), f16_to_f32(z));
    let codes = x
        .iter()
        .map(|&v| code_of(v, sf, zf, max_code(bits) as f32))
        .collect();
    (codes, s, z)
}

/// Packs `codes` (each `< 2^bits`, `codes.len() % 8 == 0`) into `out`.
pub fn pack_row(codes: &[u8], bits: u8, out: &mut [u8]) {
    let n = codes.len();
    debug_assert_eq!(n % 8, 0);
    debug_assert_eq!(out.len(), packed_row_bytes(n, bits));
    match bits {
        8 => out.copy_from_slice(codes),
        4 => {
            let q = n / 2;
            for j in 0..q {
                out[j] = (codes[j] & 15) | (codes[j + q] << 4);
            }
        }
        2 => pack2(codes, out),
        3 => {
            let (low, high) = out.split_at_mut(n / 4);
            let lows: Vec<u8> = codes.iter().map(|c| c & 3).collect();
            pack2(&lows, low);
            let q = n / 8;
            for (j, h) in high.iter_mut().enumerate() {
                *h = (0..8).map(|s| ((codes[j + s * q] >> 2) & 1) << s).sum();
            }
        }
        _ => unreachable!("pack_row bits={bits}"),
    }
}

fn pack2(codes: &[u8], out: &mut [u8]) {
    let q = codes.len() / 4;
    for (j, o) in out.iter_mut().enumerate() {
        *o = (codes[j] & 3)
            | ((codes[j + q] & 3) << 2)
            | ((codes[j + 2 * q] & 3) << 4)
            | ((codes[j + 3 * q] & 3) << 6);
    }
}

/// Unpacks a row of `out.len()` codes.
pub fn unpack_row(bytes: &[u8], bits: u8, out: &mut [u8]) {
    let n = out.len();
    match bits {
        8 => out.copy_from_slice(&bytes[..n]),
        4 => {
            let q = n / 2;
            for j in 0..q {
                out[j] = bytes[j] & 15;
                out[j + q] = bytes[j] >> 4;
            }
        }
        2 => {
            let q = n / 4;
            for s in 0..4 {
                for j in 0..q {
                    out[s * q + j] = (bytes[j] >> (2 * s)) & 3;
                }
            }
        }
        3 => {
            unpack_row(&bytes[..n / 4], 2, out);
            let q = n / 8;
            let high = &bytes[n / 4..n / 4 + q];
            for s in 0..8 {
                for j in 0..q {
                    out[s * q + j] |= ((high[j] >> s) & 1) << 2;
                }
            }
        }
        _ => unreachable!("unpack_row bits={bits}"),
    }
}

/// Unpacks `W` bytes of a 2-bit row (codes `j0..j0+W` of each of the four planes).
#[inline(always)]
fn unpack2_chunk<const W: usize>(b: &[u8], out: &mut [f32], j0: usize, q: usize) {
    let b: &[u8; W] = b[j0..j0 + W].try_into().expect("W bytes");
    let mut o = [[0f32; W]; 4];
    for j in 0..W {
        let x = b[j] as u32;
        o[0][j] = (x & 3) as f32;
        o[1][j] = ((x >> 2) & 3) as f32;
        o[2][j] = ((x >> 4) & 3) as f32;
        o[3][j] = (x >> 6) as f32;
    }
    for (s, plane) in o.iter().enumerate() {
        out[s * q + j0..s * q + j0 + W].copy_from_slice(plane);
    }
}

/// Unpacks `W` bytes of a 4-bit row (codes `j0..j0+W` of both halves).
#[inline(always)]
fn unpack4_chunk<const W: usize>(b: &[u8], out: &mut [f32], j0: usize, q: usize) {
    let b: &[u8; W] = b[j0..j0 + W].try_into().expect("W bytes");
    let mut o = [[0f32; W]; 2];
    for j in 0..W {
        let x = b[j] as u32;
        o[0][j] = (x & 15) as f32;
        o[1][j] = (x >> 4) as f32;
    }
    out[j0..j0 + W].copy_from_slice(&o[0]);
    out[q + j0..q + j0 + W].copy_from_slice(&o[1]);
}

/// Unpacks a 2-bit row of `out.len()` codes to f32, in fixed-width chunks so that LLVM
/// emits byte-to-lane widening and vector shifts.
#[inline(always)]
fn unpack2_f32(bytes: &[u8], out: &mut [f32]) {
    let q = out.len() / 4;
    let mut j = 0;
    while j + 16 <= q {
        unpack2_chunk::<16>(bytes, out, j, q);
        j += 16;
    }
    while j + 8 <= q {
        unpack2_chunk::<8>(bytes, out, j, q);
        j += 8;
    }
    while j < q {
        unpack2_chunk::<1>(bytes, out, j, q);
        j += 1;
    }
}

/// Unpacks a row of `out.len()` codes straight to f32 (vectorizable; inlined into the
/// multiversioned kernels, so it must not recurse).
#[inline(always)]
pub fn unpack_row_f32(bytes: &[u8], bits: u8, out: &mut [f32]) {
    let n = out.len();
    match bits {
        8 => {
            for (o, b) in out.iter_mut().zip(&bytes[..n]) {
                *o = *b as f32;
            }
        }
        4 => {
            let q = n / 2;
            let mut j = 0;
            while j + 16 <= q {
                unpack4_chunk::<16>(bytes, out, j, q);
                j += 16;
            }
            while j < q {
                unpack4_chunk::<1>(bytes, out, j, q);
                j += 1;
            }
        }
        2 => unpack2_f32(bytes, out),
        3 => {
            unpack2_f32(&bytes[..n / 4], out);
            let q = n / 8;
            let high = &bytes[n / 4..n / 4 + q];
            // `max(1)`: an empty row has no chunks (a zero chunk size would panic).
            for (s, o) in out.chunks_exact_mut(q.max(1)).enumerate() {
                for j in 0..q {
                    o[j] += (((high[j] >> s) & 1) * 4) as f32;
                }
            }
        }
        _ => unreachable!("unpack_row_f32 bits={bits}"),
    }
}

/// `out[i] = out[i] * scale[i] + zero[i]` with f16 scale/zero vectors (dequantizes a row of
/// codes already unpacked to f32 whose scale and zero vary along the row).
#[inline(always)]
pub fn affine_f16_vec<const FMA: bool>(out: &mut [f32], scale: &[u16], zero: &[u16]) {
    for ((o, s), z) in out.iter_mut().zip(scale).zip(zero) {
        *o = madd::<FMA>(*o, f16_to_f32(*s), f16_to_f32(*z));
    }
}

/// `out[i] = out[i] * s + z` for one scale and zero.
#[inline(always)]
pub fn affine_scalar<const FMA: bool>(out: &mut [f32], s: f32, z: f32) {
    for o in out.iter_mut() {
        *o = madd::<FMA>(*o, s, z);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_unpack_roundtrip(bits in prop::sample::select(vec![2u8, 3, 4, 8]),
                                 n8 in 1usize..40, seed in any::<u64>()) {
            let n = n8 * 8;
            let mut s = seed | 1;
            let codes: Vec<u8> = (0..n).map(|_| {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                (s % (max_code(bits) as u64 + 1)) as u8
            }).collect();
            let mut packed = vec![0u8; packed_row_bytes(n, bits)];
            pack_row(&codes, bits, &mut packed);
            let mut back = vec![0u8; n];
            unpack_row(&packed, bits, &mut back);
            prop_assert_eq!(&back, &codes);
            let mut f = vec![0f32; n];
            unpack_row_f32(&packed, bits, &mut f);
            prop_assert!(f.iter().zip(&codes).all(|(a, b)| *a == *b as f32));
        }

        #[test]
        fn quantization_error_is_bounded(bits in prop::sample::select(vec![2u8, 3, 4, 8]),
                                          g8 in 1usize..20, seed in any::<u64>(), amp in 0.01f32..100.0) {
            let g = g8 * 8;
            let mut s = seed | 1;
            let x: Vec<f32> = (0..g).map(|_| {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                ((s >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0) * amp
            }).collect();
            let (codes, sb, zb) = quantize_group_ref(&x, bits, 1.0);
            let (sc, z) = (f16_to_f32(sb), f16_to_f32(zb));
            for (v, c) in x.iter().zip(&codes) {
                let d = *c as f32 * sc + z;
                // Half a step, plus the f16 rounding of scale and zero.
                let tol = 0.5 * sc + 2e-3 * amp + sc * max_code(bits) as f32 * 1e-3;
                prop_assert!((d - v).abs() <= tol, "{} vs {} (scale {})", d, v, sc);
            }
        }
    }

    #[test]
    fn empty_rows_unpack_at_every_width() {
        // Found by the pack_unpack fuzz target: 3 bits used a zero chunk size.
        for bits in [2u8, 3, 4, 8] {
            unpack_row_f32(&[], bits, &mut []);
            unpack_row(&[], bits, &mut []);
        }
    }

    #[test]
    fn layout_bytes_are_as_documented() {
        // 2 bits, n = 8: byte j holds codes j, j+2, j+4, j+6.
        let codes = [0u8, 1, 2, 3, 3, 2, 1, 0];
        let mut out = [0u8; 2];
        pack_row(&codes, 2, &mut out);
        assert_eq!(out, [0b01_11_10_00, 0b00_10_11_01]);
        // 4 bits: byte j = code j | code j+4 << 4.
        let codes = [1u8, 2, 3, 4, 15, 14, 13, 12];
        let mut out = [0u8; 4];
        pack_row(&codes, 4, &mut out);
        assert_eq!(out, [0xF1, 0xE2, 0xD3, 0xC4]);
        // 3 bits, n = 8: 2 low-bit bytes, then 1 high-bit byte (bit s = code s >> 2).
        let codes = [7u8, 0, 4, 3, 1, 5, 6, 2];
        let mut out = [0u8; 3];
        pack_row(&codes, 3, &mut out);
        let mut low = [0u8; 2];
        pack_row(&codes.map(|c| c & 3), 2, &mut low);
        assert_eq!(&out[..2], &low);
        assert_eq!(out[2], 0b0110_0101);
        assert_eq!(packed_row_bytes(128, 2), 32);
        assert_eq!(packed_row_bytes(128, 3), 48);
        assert_eq!(packed_row_bytes(64, 16), 128);
    }

    #[test]
    fn constant_and_extreme_groups() {
        let (c, s, z) = quantize_group_ref(&[3.0; 8], 2, 1.0);
        assert_eq!(c, vec![0; 8]);
        assert_eq!(f16_to_f32(s), 0.0);
        assert_eq!(f16_to_f32(z), 3.0);
        let (c, s, _) = quantize_group_ref(&[-1e6, 1e6, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 2, 1.0);
        assert!(f16_to_f32(s).is_finite());
        assert_eq!(c[0], 0);
        // Clip 0.5 saturates the extremes to the end codes.
        let x = [-4.0, -2.0, 0.0, 2.0, 4.0, 1.0, -1.0, 0.5];
        let (c, s, z) = quantize_group_ref(&x, 2, 0.5);
        assert_eq!(f16_to_f32(z), -2.0);
        assert!((f16_to_f32(s) - 4.0 / 3.0).abs() < 1e-3);
        assert_eq!(c[0], 0);
        assert_eq!(c[4], 3);
    }
}
