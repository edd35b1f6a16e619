//! Attention mass: how much attention each key of a chunk receives from the chunk's queries.
//!
//! Bit-allocation policies rank a prefill chunk's tokens by the attention they receive
//! (accumulated attention, AKVQ-VL's saliency). Computing it from attention maps would
//! materialize `Tq x Tk` per head; here each query's score row is built in a per-thread
//! buffer, its log-sum-exp taken (merged with the caller's `prior_lse`, the part of the
//! softmax over keys outside the chunk, e.g. the packed store), and its probabilities added
//! straight into per-key sums. Memory is `O(Tk)` per thread.
//!
//! Only queries at distance `>= lag` from a key add to its mass and count: a caller that
//! reads a query's `lag` newest tokens in 16 bits cares about the attention a token gets
//! where it is read quantized. The log-sum-exp always covers every visible key.

// One counter indexes several arrays, as in attend.rs.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::attend::exp_f32;
use crate::error::{Error, Result};

/// Inputs of [`attention_mass`]. Arrays are dense and row-major.
#[derive(Clone, Copy, Debug)]
pub struct MassArgs<'a> {
    /// Queries `[B, Hq, Tq, D]`.
    pub q: &'a [f32],
    /// Keys `[B, Hkv, Tk, D]`, in the basis the queries score against (after RoPE).
    pub k: &'a [f32],
    /// `[B, Hq, Tq, Hkv, Tk, D]` sizes.
    pub dims: MassDims,
    /// Query positions `[B, Tq]`.
    pub q_pos: &'a [i64],
    /// Key positions `[B, Tk]`.
    pub k_pos: &'a [i64],
    /// Keys that exist `[B, Tk]` (padding is `false`); `None`: all.
    pub k_valid: Option<&'a [bool]>,
    /// Log-sum-exp of each query's scores over keys outside this chunk `[B, Hq, Tq]`
    /// (`-inf`: none); `None`: the chunk's keys are all the query sees.
    pub prior_lse: Option<&'a [f32]>,
    /// Score scale.
    pub scale: f32,
    /// Logit soft-capping (`cap * tanh(s / cap)`).
    pub softcap: Option<f32>,
    /// Sliding window: a key is visible when `q_pos - k_pos < window`.
    pub window: Option<usize>,
    /// Queries closer than `lag` positions to a key do not add to its mass or count.
    pub lag: usize,
}

/// Sizes of a [`MassArgs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MassDims {
    /// Sequences.
    pub b: usize,
    /// Query heads (a multiple of `hkv`).
    pub hq: usize,
    /// Queries per sequence.
    pub tq: usize,
    /// KV heads.
    pub hkv: usize,
    /// Keys per sequence.
    pub tk: usize,
    /// Head size.
    pub d: usize,
}

/// What [`attention_mass`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Mass {
    /// Attention each key receives, summed over query heads and counted queries `[B, Tk]`.
    pub mass: Vec<f32>,
    /// Queries (not heads) counted for each key `[B, Tk]`.
    pub count: Vec<u32>,
    /// Each query's log-sum-exp over the chunk's visible keys and the prior `[B, Hq, Tq]`.
    pub lse: Vec<f32>,
}

/// Checks sizes and scalars shared by the CPU and device versions.
pub fn check_dims(
    dims: MassDims,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
) -> Result<()> {
    let MassDims { hq, hkv, .. } = dims;
    if hkv == 0 || hq % hkv != 0 {
        return Err(Error::shape(
            "q",
            format!("query heads a multiple of the {hkv} KV heads"),
            hq.to_string(),
        ));
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::value(
            "scale",
            "a finite value > 0",
            scale.to_string(),
        ));
    }
    if let Some(c) = softcap {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::value("softcap", "a finite value > 0", c.to_string()));
        }
    }
    if window == Some(0) {
        return Err(Error::value("window", "at least 1", "0"));
    }
    Ok(())
}

fn check(a: &MassArgs) -> Result<()> {
    check_dims(a.dims, a.scale, a.softcap, a.window)?;
    let MassDims {
        b,
        hq,
        tq,
        hkv,
        tk,
        d,
    } = a.dims;
    let want = [
        ("q", a.q.len(), b * hq * tq * d),
        ("k", a.k.len(), b * hkv * tk * d),
        ("q_pos", a.q_pos.len(), b * tq),
        ("k_pos", a.k_pos.len(), b * tk),
    ];
    for (name, got, n) in want {
        if got != n {
            return Err(Error::shape(name, format!("{n} elements"), got.to_string()));
        }
    }
    if let Some(v) = a.k_valid {
        if v.len() != b * tk {
            return Err(Error::shape(
                "k_valid",
                format!("{} elements", b * tk),
                v.len().to_string(),
            ));
        }
    }
    if let Some(p) = a.prior_lse {
        if p.len() != b * hq * tq {
            return Err(Error::shape(
                "prior_lse",
                format!("{} elements", b * hq * tq),
                p.len().to_string(),
            ));
        }
    }
    Ok(())
}

#[inline(always)]
fn visible(a: &MassArgs, qp: i64, kp: i64) -> bool {
    kp <= qp && a.window.is_none_or(|w| qp - kp < w as i64)
}

#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    // Eight partial sums: independent chains the compiler turns into vector lanes.
    let mut acc = [0f32; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (u, v) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += u[l] * v[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (u, v) in xr.iter().zip(yr) {
        s += u * v;
    }
    s
}

/// Queries per task: enough work to amortize a task's `Tk`-long accumulators.
const BLOCK: usize = 32;

/// One task's sums: sequence, query head and first query of its block.
struct Part {
    b: usize,
    h: usize,
    t0: usize,
    mass: Vec<f32>,
    count: Vec<u32>,
    lse: Vec<f32>,
}

/// Attention mass of each key of a chunk (see the module docs).
pub fn attention_mass(a: &MassArgs) -> Result<Mass> {
    check(a)?;
    let MassDims {
        b,
        hq,
        tq,
        hkv,
        tk,
        d,
    } = a.dims;
    let group = hq / hkv;
    let blocks = tq.div_ceil(BLOCK);
    // Tasks: (sequence, query head, query block); each returns its own per-key sums.
    let parts: Vec<Part> = (0..b * hq * blocks)
        .into_par_iter()
        .map(|task| {
            let (bi, rest) = (task / (hq * blocks), task % (hq * blocks));
            let (h, blk) = (rest / blocks, rest % blocks);
            let kh = h / group;
            let keys = &a.k[(bi * hkv + kh) * tk * d..(bi * hkv + kh + 1) * tk * d];
            let kpos = &a.k_pos[bi * tk..(bi + 1) * tk];
            let kval = a.k_valid.map(|v| &v[bi * tk..(bi + 1) * tk]);
            let mut mass = vec![0f32; tk];
            // Counted once per query, by the sequence's first head.
            let mut count = if h == 0 { vec![0u32; tk] } else { Vec::new() };
            let mut row = vec![f32::NEG_INFINITY; tk];
            let (t0, t1) = (blk * BLOCK, ((blk + 1) * BLOCK).min(tq));
            let mut lses = Vec::with_capacity(t1 - t0);
            for t in t0..t1 {
                let qi = ((bi * hq + h) * tq + t) * d;
                let qv = &a.q[qi..qi + d];
                let qp = a.q_pos[bi * tq + t];
                let mut mx = f32::NEG_INFINITY;
                for j in 0..tk {
                    row[j] = if kval.is_none_or(|v| v[j]) && visible(a, qp, kpos[j]) {
                        let mut s = a.scale * dot(qv, &keys[j * d..(j + 1) * d]);
                        if let Some(c) = a.softcap {
                            s = c * (s / c).tanh();
                        }
                        mx = mx.max(s);
                        s
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                let prior = a
                    .prior_lse
                    .map_or(f32::NEG_INFINITY, |p| p[(bi * hq + h) * tq + t]);
                let m = mx.max(prior);
                let lse = if m == f32::NEG_INFINITY {
                    m
                } else {
                    let mut sum = exp_f32(prior - m);
                    for j in 0..tk {
                        sum += exp_f32(row[j] - m);
                    }
                    m + sum.ln()
                };
                lses.push(lse);
                if lse == f32::NEG_INFINITY {
                    continue;
                }
                for j in 0..tk {
                    if row[j] > f32::NEG_INFINITY && qp - kpos[j] >= a.lag as i64 {
                        mass[j] += exp_f32(row[j] - lse);
                        if h == 0 {
                            count[j] += 1;
                        }
                    }
                }
            }
            Part {
                b: bi,
                h,
                t0,
                mass,
                count,
                lse: lses,
            }
        })
        .collect();
    let mut out = Mass {
        mass: vec![0f32; b * tk],
        count: vec![0u32; b * tk],
        lse: vec![0f32; b * hq * tq],
    };
    // Summed in task order, so results do not depend on scheduling.
    for p in parts {
        let keys = p.b * tk..(p.b + 1) * tk;
        for (acc, m) in out.mass[keys.clone()].iter_mut().zip(&p.mass) {
            *acc += m;
        }
        for (acc, c) in out.count[keys].iter_mut().zip(&p.count) {
            *acc += c;
        }
        let at = (p.b * hq + p.h) * tq + p.t0;
        out.lse[at..at + p.lse.len()].copy_from_slice(&p.lse);
    }
    Ok(out)
}

/// The same in float64, one score at a time: the reference the kernel is tested against.
pub fn attention_mass_reference(a: &MassArgs) -> Result<(Vec<f64>, Vec<u32>, Vec<f64>)> {
    check(a)?;
    let MassDims {
        b,
        hq,
        tq,
        hkv,
        tk,
        d,
    } = a.dims;
    let group = hq / hkv;
    let mut mass = vec![0f64; b * tk];
    let mut count = vec![0u32; b * tk];
    let mut lses = vec![0f64; b * hq * tq];
    for bi in 0..b {
        for h in 0..hq {
            let kh = h / group;
            for t in 0..tq {
                let qp = a.q_pos[bi * tq + t];
                let mut scores = vec![None; tk];
                for j in 0..tk {
                    let kp = a.k_pos[bi * tk + j];
                    if a.k_valid.is_some_and(|v| !v[bi * tk + j]) || !visible(a, qp, kp) {
                        continue;
                    }
                    let mut s = 0f64;
                    for c in 0..d {
                        s += a.q[((bi * hq + h) * tq + t) * d + c] as f64
                            * a.k[((bi * hkv + kh) * tk + j) * d + c] as f64;
                    }
                    s *= a.scale as f64;
                    if let Some(cap) = a.softcap {
                        s = cap as f64 * (s / cap as f64).tanh();
                    }
                    scores[j] = Some(s);
                }
                let mut total: f64 = scores.iter().flatten().map(|s| s.exp()).sum();
                if let Some(p) = a.prior_lse {
                    total += (p[(bi * hq + h) * tq + t] as f64).exp();
                }
                let lse = total.ln();
                lses[(bi * hq + h) * tq + t] = lse;
                for j in 0..tk {
                    let kp = a.k_pos[bi * tk + j];
                    if let Some(s) = scores[j] {
                        if qp - kp >= a.lag as i64 {
                            mass[bi * tk + j] += (s - lse).exp();
                            if h == 0 {
                                count[bi * tk + j] += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    Ok((mass, count, lses))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    struct Case {
        dims: MassDims,
        q: Vec<f32>,
        k: Vec<f32>,
        q_pos: Vec<i64>,
        k_pos: Vec<i64>,
        valid: Vec<bool>,
        prior: Vec<f32>,
    }

    fn case(seed: u64, dims: MassDims) -> Case {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let MassDims {
            b,
            hq,
            tq,
            hkv,
            tk,
            d,
        } = dims;
        let mut f = |n: usize, s: f32| (0..n).map(|_| r.random_range(-s..s)).collect::<Vec<_>>();
        let q = f(b * hq * tq * d, 2.0);
        let k = f(b * hkv * tk * d, 2.0);
        let prior = f(b * hq * tq, 3.0);
        let mut r = rand::rngs::StdRng::seed_from_u64(seed + 1);
        // Keys at the chunk's positions; queries at the last tq of them.
        let mut k_pos = Vec::new();
        let mut q_pos = Vec::new();
        let mut valid = Vec::new();
        for _ in 0..b {
            let base: i64 = r.random_range(0..50);
            let ks: Vec<i64> = (0..tk as i64).map(|j| base + 2 * j).collect();
            q_pos.extend_from_slice(&ks[tk - tq..]);
            k_pos.extend(ks);
            valid.extend((0..tk).map(|_| r.random_range(0..10) > 0));
        }
        Case {
            dims,
            q,
            k,
            q_pos,
            k_pos,
            valid,
            prior,
        }
    }

    fn args<'a>(c: &'a Case, prior: bool, valid: bool) -> MassArgs<'a> {
        MassArgs {
            q: &c.q,
            k: &c.k,
            dims: c.dims,
            q_pos: &c.q_pos,
            k_pos: &c.k_pos,
            k_valid: valid.then_some(&c.valid[..]),
            prior_lse: prior.then_some(&c.prior[..]),
            scale: 0.3,
            softcap: None,
            window: None,
            lag: 0,
        }
    }

    fn compare(a: &MassArgs) {
        let got = attention_mass(a).unwrap();
        let (mass, count, lse) = attention_mass_reference(a).unwrap();
        assert_eq!(got.count, count);
        for (g, w) in got.mass.iter().zip(&mass) {
            assert!(
                (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{g} vs {w}"
            );
        }
        for (g, w) in got.lse.iter().zip(&lse) {
            if w.is_infinite() {
                assert_eq!(*g as f64, *w);
            } else {
                assert!(
                    (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn matches_reference_on_odd_sizes() {
        for (seed, dims) in [
            (
                1,
                MassDims {
                    b: 1,
                    hq: 1,
                    tq: 1,
                    hkv: 1,
                    tk: 1,
                    d: 1,
                },
            ),
            (
                2,
                MassDims {
                    b: 2,
                    hq: 6,
                    tq: 37,
                    hkv: 2,
                    tk: 37,
                    d: 13,
                },
            ),
            (
                3,
                MassDims {
                    b: 3,
                    hq: 3,
                    tq: 5,
                    hkv: 3,
                    tk: 70,
                    d: 64,
                },
            ),
            (
                4,
                MassDims {
                    b: 1,
                    hq: 4,
                    tq: 65,
                    hkv: 1,
                    tk: 66,
                    d: 24,
                },
            ),
        ] {
            let c = case(seed, dims);
            for (prior, valid) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut a = args(&c, prior, valid);
                compare(&a);
                a.softcap = Some(1.5);
                a.window = Some(9);
                a.lag = 3;
                compare(&a);
                a.window = Some(1);
                a.lag = 0;
                compare(&a);
            }
        }
    }

    #[test]
    fn mass_is_a_distribution_without_prior() {
        // Every query's probabilities sum to one, so the chunk's mass sums to the number of
        // (query, head) pairs that see a key.
        let dims = MassDims {
            b: 2,
            hq: 4,
            tq: 20,
            hkv: 2,
            tk: 20,
            d: 8,
        };
        let c = case(7, dims);
        let m = attention_mass(&args(&c, false, false)).unwrap();
        for bi in 0..2 {
            let s: f32 = m.mass[bi * 20..(bi + 1) * 20].iter().sum();
            assert!((s - 80.0).abs() < 1e-3, "{s}");
        }
        // The lag drops exactly the diagonal band: with lag 1 no query counts itself.
        let mut a = args(&c, false, false);
        a.lag = 1;
        let m = attention_mass(&a).unwrap();
        assert_eq!(m.count[19], 0);
        assert_eq!(m.count[0], 19);
    }

    #[test]
    fn refuses_bad_input() {
        let dims = MassDims {
            b: 1,
            hq: 3,
            tq: 2,
            hkv: 2,
            tk: 2,
            d: 4,
        };
        let c = case(9, MassDims { hq: 2, ..dims });
        let mut a = args(&c, false, false);
        a.dims = dims;
        assert!(matches!(attention_mass(&a), Err(Error::Shape { .. })));
        let mut a = args(&c, false, false);
        a.q_pos = &c.q_pos[..1];
        assert!(matches!(attention_mass(&a), Err(Error::Shape { .. })));
        let mut a = args(&c, false, false);
        a.window = Some(0);
        assert!(matches!(attention_mass(&a), Err(Error::Value { .. })));
    }
}
