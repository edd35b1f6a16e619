//! Rotary position embedding in Hugging Face's Llama convention (`rotate_half`: channel `i`
//! pairs with `i + r/2` for `i < r/2`, where `r = 2 * inv_freq.len()` is the rotary width;
//! channels `r..head_dim` pass through, as with partial rotary). Given `inv_freq` and the
//! attention scaling factor, every transformers RoPE variant (default, linear, dynamic,
//! llama3, yarn, longrope) can be reproduced: they differ only in those two inputs.
//!
//! The angle is `f32(position) * inv_freq[i]` rounded to f32, as transformers computes it;
//! its cosine and sine are then evaluated accurately (f64 range reduction), so keys rotated
//! here agree with queries rotated by the model.

use crate::error::{Error, Result};

/// RoPE parameters of one store.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// Inverse frequencies, `r/2` of them.
    pub inv_freq: Vec<f32>,
    /// Multiplies both cosine and sine (yarn/longrope's `attention_scaling`).
    pub scaling: f32,
}

impl Rope {
    /// Validates and builds RoPE parameters for heads of `head_dim` channels.
    pub fn new(inv_freq: Vec<f32>, scaling: f32, head_dim: usize) -> Result<Self> {
        if inv_freq.is_empty() || 2 * inv_freq.len() > head_dim {
            return Err(Error::shape(
                "rope_inv_freq",
                format!("[r/2] with 1 <= r/2 <= head_dim/2 = {}", head_dim / 2),
                format!("[{}]", inv_freq.len()),
            ));
        }
        if let Some(bad) = inv_freq.iter().find(|f| !f.is_finite()) {
            return Err(Error::value(
                "rope_inv_freq",
                "finite values",
                bad.to_string(),
            ));
        }
        if !(scaling.is_finite() && scaling > 0.0) {
            return Err(Error::value(
                "rope_scaling",
                "a finite value > 0",
                scaling.to_string(),
            ));
        }
        Ok(Rope { inv_freq, scaling })
    }

    /// Half the rotary width.
    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// Applies RoPE to one vector of `head_dim` channels at `pos` (reference path).
    pub fn apply(&self, x: &mut [f32], pos: i32) {
        let h = self.half();
        for i in 0..h {
            let (c, s) = sincos_f32_angle(pos as f32 * self.inv_freq[i]);
            let (c, s) = (c * self.scaling, s * self.scaling);
            let (a, b) = (x[i], x[i + h]);
            x[i] = a * c - b * s;
            x[i + h] = b * c + a * s;
        }
    }
}

impl Rope {
    /// Undoes [`Rope::apply`] at `pos` (keys after RoPE back to before it): the rotation by
    /// the opposite angle, divided by the scaling.
    pub fn unapply(&self, x: &mut [f32], pos: i32) {
        let h = self.half();
        let inv = 1.0 / self.scaling;
        for i in 0..h {
            let (c, s) = sincos_f32_angle(pos as f32 * self.inv_freq[i]);
            let (a, b) = (x[i], x[i + h]);
            x[i] = (a * c + b * s) * inv;
            x[i + h] = (b * c - a * s) * inv;
        }
    }
}

/// `(cos x, sin x)` of an f32 angle, accurate to about one f32 ulp: f64 Cody-Waite
/// reduction by pi/2 (exact enough for any f32 angle a position can make), then f32 minimax
/// polynomials on [-pi/4, pi/4] (Cephes' `sinf`/`cosf` coefficients), which run at twice the
/// f64 lane count. Branch-free so that loops vectorize.
#[inline(always)]
pub fn sincos_f32_angle(x: f32) -> (f32, f32) {
    const PIO2_1: f64 = 1.570_796_326_734_125_6; // first 33 bits of pi/2
    const PIO2_1T: f64 = 6.077_100_506_506_192e-11; // pi/2 - PIO2_1
    let xd = x as f64;
    // floor(x + 0.5) and float-only quadrant logic keep the loop vectorizable (`round` and
    // saturating `as i64` casts do not vectorize well).
    let k = (xd * std::f64::consts::FRAC_2_PI + 0.5).floor();
    let r = ((xd - k * PIO2_1) - k * PIO2_1T) as f32;
    let q = (k - 4.0 * (k * 0.25).floor()) as f32; // 0, 1, 2 or 3
    let r2 = r * r;
    let s = r + r * r2 * (-1.666_665_5e-1 + r2 * (8.332_161e-3 + r2 * -1.951_529_6e-4));
    let c =
        1.0 - 0.5 * r2 + r2 * r2 * (4.166_664_6e-2 + r2 * (-1.388_731_6e-3 + r2 * 2.443_315_7e-5));
    let odd = q == 1.0 || q == 3.0;
    let (sv, cv) = (if odd { c } else { s }, if odd { -s } else { c });
    let neg = q >= 2.0;
    let (sv, cv) = (if neg { -sv } else { sv }, if neg { -cv } else { cv });
    (cv, sv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sincos_matches_libm() {
        let mut worst = 0.0f64;
        for i in 0..200_000 {
            let x = (i as f32 - 100_000.0) * 0.731_f32 + (i % 7) as f32 * 0.013;
            let (c, s) = sincos_f32_angle(x);
            let xd = x as f64;
            worst = worst
                .max((c as f64 - xd.cos()).abs())
                .max((s as f64 - xd.sin()).abs());
        }
        assert!(worst < 2e-7, "worst {worst}");
    }

    #[test]
    fn unapply_inverts_apply() {
        let r = Rope::new(vec![1.0, 0.1, 0.01], 1.3, 8).unwrap();
        for pos in [0, 1, 17, 4095, 100_000] {
            let x: Vec<f32> = (0..8).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let mut y = x.clone();
            r.apply(&mut y, pos);
            assert!(y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 1e-3) || pos == 0);
            r.unapply(&mut y, pos);
            for (a, b) in y.iter().zip(&x) {
                assert!((a - b).abs() < 1e-5, "pos {pos}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn apply_matches_rotate_half_definition() {
        let d = 8;
        let rope = Rope::new(vec![1.0, 0.1, 0.01], 1.5, d).unwrap();
        let x: Vec<f32> = (0..d).map(|i| i as f32 - 3.5).collect();
        let mut y = x.clone();
        rope.apply(&mut y, 7);
        let h = 3;
        for i in 0..h {
            let a = 7.0f64 * rope.inv_freq[i] as f64;
            let (c, s) = (a.cos() * 1.5, a.sin() * 1.5);
            let want_lo = x[i] as f64 * c - x[i + h] as f64 * s;
            let want_hi = x[i + h] as f64 * c + x[i] as f64 * s;
            assert!((y[i] as f64 - want_lo).abs() < 1e-5);
            assert!((y[i + h] as f64 - want_hi).abs() < 1e-5);
        }
        // Channels past the rotary width pass through.
        assert_eq!(&y[6..], &x[6..]);
        assert!(Rope::new(vec![1.0; 5], 1.0, 8).is_err());
        assert!(Rope::new(vec![1.0], 0.0, 8).is_err());
    }
}
