//! Runtime CPU feature dispatch. Hot kernels are written once as plain Rust that LLVM
//! auto-vectorizes, then compiled three times (scalar, AVX2+FMA, AVX-512) by
//! [`multiversion!`]; the best level the CPU supports is picked at run time, so the wheel
//! needs no `target-cpu=native`.

use std::sync::OnceLock;

/// An instruction-set level a kernel can be compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Baseline x86-64 (SSE2) or any non-x86 target.
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VL/DQ and VNNI.
    Avx512,
}

/// The best level this CPU supports. `ROTATEKV_SIMD=scalar|avx2|avx512` lowers it (never
/// raises it above what the CPU has), for testing and for measuring the dispatch.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = detect();
        match std::env::var("ROTATEKV_SIMD").ok().as_deref() {
            Some("scalar") => Level::Scalar,
            Some("avx2") if best != Level::Scalar => Level::Avx2,
            _ => best,
        }
    })
}

/// Every level this CPU can run, lowest first (for tests that compare them).
pub fn available_levels() -> Vec<Level> {
    let best = detect();
    let mut v = vec![Level::Scalar];
    if best != Level::Scalar {
        v.push(Level::Avx2);
    }
    if best == Level::Avx512 {
        v.push(Level::Avx512);
    }
    v
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("bmi2");
        let avx512 = avx2
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vnni");
        if avx512 {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// `a * b + c`, fused when the caller was compiled with FMA (`FMA = true`): without the
/// feature `mul_add` becomes a slow libm call.
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Defines `pub fn $name(level: Level, args..)` that runs `$body::<FMA>(args..)` compiled for
/// the given level. `$body` must be `#[inline(always)]` and generic over `const FMA: bool`.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        $(#[$meta])*
        $vis fn $name(level: $crate::simd::Level, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: only called below after `level` confirmed these CPU features.
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")]
                unsafe fn v512($($arg: $ty),*) $(-> $ret)? { $body::<true>($($arg),*) }
                // SAFETY: as above.
                #[target_feature(enable = "avx2,fma,f16c,bmi2")]
                unsafe fn v256($($arg: $ty),*) $(-> $ret)? { $body::<true>($($arg),*) }
                match level {
                    // SAFETY: `level` is at most `simd::level()`, which checked these features.
                    $crate::simd::Level::Avx512 => return unsafe { v512($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::Level::Avx2 => return unsafe { v256($($arg),*) },
                    $crate::simd::Level::Scalar => {}
                }
            }
            $body::<false>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// f16 bits to f32, branch-free so that loops over it vectorize (the `half` crate's scalar
/// conversion does not).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = (h & 0x7fff) << 13;
    let exp = em & (0x7c00 << 13);
    let normal = f32::from_bits(em + ((127 - 15) << 23));
    // Inf/NaN: push the exponent to all ones.
    let infnan = f32::from_bits(em + (224 << 23));
    // Subnormals: renormalize with a magic subtraction.
    let sub = f32::from_bits(em + (113 << 23)) - f32::from_bits(113 << 23);
    let v = if exp == 0x7c00 << 13 {
        infnan
    } else if exp == 0 {
        sub
    } else {
        normal
    };
    f32::from_bits(v.to_bits() | sign)
}

/// bf16 bits to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 to f16 bits, round to nearest even (as torch's `.half()`).
#[inline(always)]
pub fn f32_to_f16(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}

/// f32 to bf16 bits, round to nearest even (as torch's `.bfloat16()`).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_half_for_every_bit_pattern() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            if want.is_nan() {
                assert!(got.is_nan(), "{h:#x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{h:#x}");
            }
        }
    }

    #[test]
    fn levels_are_ordered_and_include_scalar() {
        let l = available_levels();
        assert_eq!(l[0], Level::Scalar);
        assert!(l.contains(&level()));
    }
}
