//! Orthonormal Walsh-Hadamard transforms of size `2^k` (k <= 15) and `m * 2^k` for
//! m in {12, 20, 28}.
//!
//! Convention: `H_n = (S_m ⊗ W_{2^k}) / sqrt(n)` where `W` is Sylvester's matrix
//! (`W[i][j] = (-1)^popcount(i & j)`) and `S_m` a ±1 Paley matrix (`S_1 = [1]`). A vector is
//! indexed `x[a * 2^k + c]`, `a < m`, `c < 2^k`. `W` is symmetric, so the inverse is
//! `(S_m^T ⊗ W) / sqrt(n)`; for m = 1 the transform is its own inverse. The CUDA kernels use
//! the same matrices.
//!
//! Two shapes of work: one vector (`forward`, `inverse`), and a `[n][w]` row-major block
//! transformed along `n` for all `w` columns at once (`forward_cols`, `inverse_cols`), which
//! vectorizes every butterfly stage across columns (tokens of a page, in the kernels).

use crate::error::{Error, Result};
use crate::simd::{self, multiversion};

/// The largest power-of-two factor supported.
pub const MAX_LOG2: u32 = 15;

/// A Hadamard transform of one size.
#[derive(Clone, Debug, PartialEq)]
pub struct Hadamard {
    n: usize,
    m: usize,
    pow2: usize,
    /// `S_m`, row-major, entries ±1.
    s: Vec<f32>,
    norm: f32,
}

/// Whether `n` is a supported transform size.
pub fn supported(n: usize) -> bool {
    split(n).is_some()
}

fn split(n: usize) -> Option<(usize, usize)> {
    if n == 0 {
        return None;
    }
    for m in [1usize, 12, 20, 28] {
        if n.is_multiple_of(m) {
            let p = n / m;
            if p.is_power_of_two() && p.trailing_zeros() <= MAX_LOG2 {
                return Some((m, p));
            }
        }
    }
    None
}

/// Quadratic character of `a` modulo the prime `q` (0 for multiples of q).
fn chi(a: i64, q: i64) -> f32 {
    let a = a.rem_euclid(q);
    if a == 0 {
        return 0.0;
    }
    if (1..q).any(|x| (x * x) % q == a) {
        1.0
    } else {
        -1.0
    }
}

/// A ±1 Hadamard matrix of order m in {1, 12, 20, 28} (Paley constructions), row-major.
fn paley(m: usize) -> Vec<f32> {
    match m {
        1 => vec![1.0],
        12 | 20 => {
            // Paley I, q = m - 1 ≡ 3 (mod 4): H = I + [[0, 1ᵀ], [-1, Q]].
            let q = (m - 1) as i64;
            let mut h = vec![0.0f32; m * m];
            for i in 0..m {
                for j in 0..m {
                    let s = if i == 0 && j == 0 {
                        0.0
                    } else if i == 0 {
                        1.0
                    } else if j == 0 {
                        -1.0
                    } else {
                        chi(j as i64 - i as i64, q)
                    };
                    h[i * m + j] = s + if i == j { 1.0 } else { 0.0 };
                }
            }
            h
        }
        28 => {
            // Paley II, q = 13 ≡ 1 (mod 4): H = C ⊗ [[1,-1],[-1,-1]] + I ⊗ [[1,1],[1,-1]] with
            // C = [[0, 1ᵀ], [1, Q]] the symmetric conference matrix of order 14.
            let q = 13i64;
            let c = |i: usize, j: usize| -> f32 {
                if i == 0 && j == 0 {
                    0.0
                } else if i == 0 || j == 0 {
                    1.0
                } else {
                    chi(j as i64 - i as i64, q)
                }
            };
            let a = [[1.0f32, -1.0], [-1.0, -1.0]];
            let b = [[1.0f32, 1.0], [1.0, -1.0]];
            let mut h = vec![0.0f32; 28 * 28];
            for i in 0..14 {
                for j in 0..14 {
                    for r in 0..2 {
                        for s in 0..2 {
                            let id = if i == j { b[r][s] } else { 0.0 };
                            h[(2 * i + r) * 28 + 2 * j + s] = c(i, j) * a[r][s] + id;
                        }
                    }
                }
            }
            h
        }
        _ => unreachable!("paley({m})"),
    }
}

impl Hadamard {
    /// The transform of size `n`, or an error naming the supported sizes.
    pub fn new(n: usize) -> Result<Self> {
        let (m, pow2) = split(n).ok_or_else(|| {
            Error::value(
                "hadamard size",
                "2^k (k <= 15) or 12/20/28 * 2^k",
                n.to_string(),
            )
        })?;
        Ok(Hadamard {
            n,
            m,
            pow2,
            s: paley(m),
            norm: 1.0 / (n as f32).sqrt(),
        })
    }

    /// The size.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always false: a transform has size >= 1.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// `x <- H x`.
    pub fn forward(&self, x: &mut [f32]) {
        self.forward_cols(x, 1)
    }

    /// `x <- Hᵀ x`.
    pub fn inverse(&self, x: &mut [f32]) {
        self.inverse_cols(x, 1)
    }

    /// `X <- H X` for a row-major `[n][w]` block.
    pub fn forward_cols(&self, x: &mut [f32], w: usize) {
        cols_at(simd::level(), self, x, w, false)
    }

    /// `X <- Hᵀ X` for a row-major `[n][w]` block.
    pub fn inverse_cols(&self, x: &mut [f32], w: usize) {
        cols_at(simd::level(), self, x, w, true)
    }

    /// The normalization `1/sqrt(n)` that [`cols_raw_body`] leaves out.
    pub fn norm(&self) -> f32 {
        self.norm
    }

    /// The dense matrix `H` (row-major, normalized): the reference the fast paths are
    /// tested against.
    pub fn matrix(&self) -> Vec<f32> {
        let n = self.n;
        let p = self.pow2;
        let mut h = vec![0.0f32; n * n];
        for i in 0..n {
            for j in 0..n {
                let (a, c) = (i / p, i % p);
                let (a2, c2) = (j / p, j % p);
                let w = if (c & c2).count_ones() % 2 == 0 {
                    1.0
                } else {
                    -1.0
                };
                h[i * n + j] = self.s[a * self.m + a2] * w * self.norm;
            }
        }
        h
    }
}

multiversion! {
    /// Transforms a `[n][w]` block along `n` at the given SIMD level.
    pub fn cols_at(h: &Hadamard, x: &mut [f32], w: usize, inverse: bool) => cols_body
}

#[inline(always)]
pub(crate) fn cols_body<const FMA: bool>(h: &Hadamard, x: &mut [f32], w: usize, inverse: bool) {
    cols_raw_body(h, x, w, inverse);
    let norm = h.norm;
    x.iter_mut().for_each(|v| *v *= norm);
}

/// `X <- sqrt(n) * H X` (or `Hᵀ`): the transform without its normalization, for callers
/// that fold the factor [`Hadamard::norm`] into a later multiply instead of a pass over `X`.
#[inline(always)]
pub(crate) fn cols_raw_body(h: &Hadamard, x: &mut [f32], w: usize, inverse: bool) {
    let n = h.n;
    assert_eq!(x.len(), n * w, "hadamard block length");
    let p = h.pow2;
    // Butterflies of Sylvester's matrix inside each of the m blocks of p rows. The stages
    // commute, so they run in two phases: first every stage whose pairs lie inside an
    // L1-sized sub-block of rows, sub-block by sub-block, then the wider stages over the
    // whole block; both two stages per pass (radix 4).
    let sub = {
        let mut s = 1usize;
        while 2 * s <= p && 2 * s * w * 4 <= 16 * 1024 {
            s *= 2;
        }
        s
    };
    for blk in x.chunks_exact_mut(p * w) {
        for sb in blk.chunks_exact_mut(sub * w) {
            butterflies(sb, sub, w, w, 1, sub);
        }
        butterflies(blk, p, w, w, sub, p);
    }
    if h.m > 1 {
        // Dense S_m across the m blocks, one column-row (c) at a time.
        let m = h.m;
        let mut tmp = vec![0.0f32; m * w];
        for c in 0..p {
            for (a, t) in tmp.chunks_exact_mut(w).enumerate() {
                t.fill(0.0);
                for a2 in 0..m {
                    let s = if inverse {
                        h.s[a2 * m + a]
                    } else {
                        h.s[a * m + a2]
                    };
                    let src = &x[(a2 * p + c) * w..(a2 * p + c) * w + w];
                    if s > 0.0 {
                        t.iter_mut().zip(src).for_each(|(t, v)| *t += *v);
                    } else {
                        t.iter_mut().zip(src).for_each(|(t, v)| *t -= *v);
                    }
                }
            }
            for (a, t) in tmp.chunks_exact(w).enumerate() {
                x[(a * p + c) * w..(a * p + c) * w + w].copy_from_slice(t);
            }
        }
    }
}

/// Eight disjoint `w`-long rows of `blk`, `stride` apart.
#[inline(always)]
fn rows8(blk: &mut [f32], stride: usize, w: usize) -> [&mut [f32]; 8] {
    let (r0, rest) = blk.split_at_mut(stride);
    let (r1, rest) = rest.split_at_mut(stride);
    let (r2, rest) = rest.split_at_mut(stride);
    let (r3, rest) = rest.split_at_mut(stride);
    let (r4, rest) = rest.split_at_mut(stride);
    let (r5, rest) = rest.split_at_mut(stride);
    let (r6, r7) = rest.split_at_mut(stride);
    [
        &mut r0[..w],
        &mut r1[..w],
        &mut r2[..w],
        &mut r3[..w],
        &mut r4[..w],
        &mut r5[..w],
        &mut r6[..w],
        &mut r7[..w],
    ]
}

/// Sylvester butterfly stages `len = from, 2*from, .. < to` over `rows` rows of `w` columns,
/// row `r` starting at `r * rs` (`rs = w` for contiguous rows).
#[inline(always)]
fn butterflies(blk: &mut [f32], rows: usize, w: usize, rs: usize, from: usize, to: usize) {
    let mut len = from;
    // Stages left: three per pass (radix 8) while that leaves no lone stage, since every
    // pass over a block that does not fit in L1 costs a trip to L2.
    let stages = |len: usize| (to / len).trailing_zeros();
    while stages(len) >= 3 && stages(len) != 4 {
        for i in (0..rows).step_by(8 * len) {
            for j in i..i + len {
                let r = rows8(&mut blk[j * rs..], len * rs, w);
                let [a0, a1, a2, a3, a4, a5, a6, a7] = r;
                for col in 0..w {
                    let (b0, b1) = (a0[col] + a1[col], a0[col] - a1[col]);
                    let (b2, b3) = (a2[col] + a3[col], a2[col] - a3[col]);
                    let (b4, b5) = (a4[col] + a5[col], a4[col] - a5[col]);
                    let (b6, b7) = (a6[col] + a7[col], a6[col] - a7[col]);
                    let (c0, c2) = (b0 + b2, b0 - b2);
                    let (c1, c3) = (b1 + b3, b1 - b3);
                    let (c4, c6) = (b4 + b6, b4 - b6);
                    let (c5, c7) = (b5 + b7, b5 - b7);
                    a0[col] = c0 + c4;
                    a4[col] = c0 - c4;
                    a1[col] = c1 + c5;
                    a5[col] = c1 - c5;
                    a2[col] = c2 + c6;
                    a6[col] = c2 - c6;
                    a3[col] = c3 + c7;
                    a7[col] = c3 - c7;
                }
            }
        }
        len *= 8;
    }
    while 2 * len < to {
        for i in (0..rows).step_by(4 * len) {
            for j in i..i + len {
                let (r0, rest) = blk[j * rs..].split_at_mut(len * rs);
                let (r1, rest) = rest.split_at_mut(len * rs);
                let (r2, rest) = rest.split_at_mut(len * rs);
                let (a, b, c, d) = (&mut r0[..w], &mut r1[..w], &mut r2[..w], &mut rest[..w]);
                for col in 0..w {
                    let (s0, d0) = (a[col] + b[col], a[col] - b[col]);
                    let (s1, d1) = (c[col] + d[col], c[col] - d[col]);
                    a[col] = s0 + s1;
                    b[col] = d0 + d1;
                    c[col] = s0 - s1;
                    d[col] = d0 - d1;
                }
            }
        }
        len *= 4;
    }
    if len < to {
        for i in (0..rows).step_by(2 * len) {
            for j in i..i + len {
                let (lo, hi) = blk.split_at_mut((j + len) * rs);
                let a = &mut lo[j * rs..j * rs + w];
                let b = &mut hi[..w];
                for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                    let (s, d) = (*u + *v, *u - *v);
                    *u = s;
                    *v = d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::available_levels;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn matvec(h: &[f32], x: &[f32], n: usize, transpose: bool) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| {
                        let hij = if transpose {
                            h[j * n + i]
                        } else {
                            h[i * n + j]
                        };
                        hij as f64 * x[j] as f64
                    })
                    .sum::<f64>() as f32
            })
            .collect()
    }

    #[test]
    fn paley_matrices_are_hadamard() {
        for m in [1usize, 12, 20, 28] {
            let s = paley(m);
            for i in 0..m {
                for j in 0..m {
                    let d: f32 = (0..m).map(|k| s[i * m + k] * s[j * m + k]).sum();
                    let want = if i == j { m as f32 } else { 0.0 };
                    assert_eq!(d, want, "m={m} i={i} j={j}");
                }
                assert!(s[i * m..(i + 1) * m].iter().all(|v| v.abs() == 1.0));
            }
        }
    }

    #[test]
    fn sizes() {
        for n in [
            1,
            2,
            4,
            64,
            128,
            192,
            320,
            448,
            32768,
            12,
            20,
            28,
            12 * 32768,
        ] {
            assert!(supported(n), "{n}");
        }
        for n in [0, 3, 6, 24 * 3, 36, 65536, 100] {
            assert!(!supported(n), "{n}");
        }
        assert!(Hadamard::new(65536).is_err());
    }

    #[test]
    fn fast_matches_dense_reference_on_every_size_kind_and_level() {
        let sizes = [
            1, 2, 8, 16, 64, 128, 256, 12, 24, 192, 20, 80, 320, 28, 56, 448, 1024,
        ];
        for (si, &n) in sizes.iter().enumerate() {
            let h = Hadamard::new(n).unwrap();
            let dense = h.matrix();
            for w in [1usize, 3, 17] {
                let x = rand_vec(n * w, si as u64 * 31 + w as u64);
                for &level in &available_levels() {
                    for inverse in [false, true] {
                        let mut y = x.clone();
                        cols_at(level, &h, &mut y, w, inverse);
                        for col in 0..w {
                            let xc: Vec<f32> = (0..n).map(|i| x[i * w + col]).collect();
                            let want = matvec(&dense, &xc, n, inverse);
                            for i in 0..n {
                                let got = y[i * w + col];
                                assert!(
                                    (got - want[i]).abs() <= 1e-5 * (1.0 + want[i].abs()),
                                    "n={n} w={w} {level:?} inv={inverse} i={i}: {got} vs {}",
                                    want[i]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn orthonormal_roundtrip_and_norm() {
        for n in [128, 192, 320, 448, 4096, 32768] {
            let h = Hadamard::new(n).unwrap();
            let x = rand_vec(n, n as u64);
            let mut y = x.clone();
            h.forward(&mut y);
            let nx: f64 = x.iter().map(|v| (*v as f64).powi(2)).sum();
            let ny: f64 = y.iter().map(|v| (*v as f64).powi(2)).sum();
            assert!((nx - ny).abs() < 1e-4 * nx, "norm n={n}");
            h.inverse(&mut y);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-5, "roundtrip n={n}");
            }
        }
    }
}
