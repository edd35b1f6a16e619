//! Helpers shared by the integration tests: a small PRNG, RoPE parameters, and random token
//! chunks shaped like real keys (a few outlier channels).

#![allow(dead_code)]

use rotatekv::{FpFormat, Rope};

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * amp).collect()
    }
}

/// RoPE of a head of `d` channels (a quarter of them rotary when `partial`), scaling 1.1.
pub fn rope_for(d: usize, partial: bool) -> Rope {
    let half = if partial { d / 4 } else { d / 2 };
    let r = 2 * half;
    let inv: Vec<f32> = (0..half)
        .map(|i| 10000f32.powf(-((2 * i) as f32) / r as f32))
        .collect();
    Rope::new(inv, 1.1, d).unwrap()
}

/// One random append `[B, H, T, D]`: keys, values, positions continuing `next`, and the
/// per-token masks and bits the test cases switch on.
pub struct Chunk {
    pub t: usize,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub pos: Vec<i64>,
    pub valid: Vec<bool>,
    pub protect: Vec<bool>,
    pub bits: Vec<u8>,
}

/// A chunk of `t` tokens; with `masked`, every fifth token is padding (`valid` false, no
/// position of its own); with `round`, every value is representable in that 16-bit format.
pub fn chunk(
    rng: &mut Rng,
    (b, h, t, d): (usize, usize, usize, usize),
    next: &mut [i64],
    masked: bool,
    round: Option<FpFormat>,
) -> Chunk {
    let n = b * h * t * d;
    let r = |x: f32| round.map_or(x, |f| f.round(x));
    let mut k = rng.vec(n, 1.0);
    for (i, x) in k.iter_mut().enumerate() {
        if i % d == 3 || i % d == d - 2 {
            *x *= 8.0;
        }
        *x = r(*x);
    }
    let v: Vec<f32> = rng.vec(n, 1.0).into_iter().map(r).collect();
    let valid: Vec<bool> = (0..b * t).map(|i| !masked || i % 5 != 1).collect();
    let protect: Vec<bool> = (0..b * t).map(|i| i % 7 == 0).collect();
    let bits: Vec<u8> = (0..b * t).map(|i| [2u8, 4, 8, 16, 3][i % 5]).collect();
    let mut pos = vec![0i64; b * t];
    for bi in 0..b {
        for j in 0..t {
            pos[bi * t + j] = next[bi];
            if valid[bi * t + j] {
                next[bi] += 1;
            }
        }
    }
    Chunk {
        t,
        k,
        v,
        pos,
        valid,
        protect,
        bits,
    }
}
