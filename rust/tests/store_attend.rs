//! The store and the fused attention against plain references, on fresh random inputs.

use rotatekv::quant::quantize_group_ref;
use rotatekv::simd::{available_levels, f16_to_f32};
use rotatekv::*;

mod common;
use common::{chunk, rope_for, Rng};

/// Float64 attention over the store's own dequantized tokens: outputs `[B, Hq, Tq, D]` and
/// log-sum-exps `[B, Hq, Tq]`.
#[allow(clippy::too_many_arguments)]
fn reference(
    store: &KVStore,
    layer: usize,
    q: &[f32],
    hq: usize,
    tq: usize,
    qpos: &[i32],
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
    lag: usize,
) -> (Vec<f32>, Vec<f32>) {
    let m = &store.meta;
    let (hkv, d) = (m.heads, m.d);
    let gqa = hq / hkv;
    let mut out = vec![0f32; m.batch * hq * tq * d];
    let mut lse = vec![f32::NEG_INFINITY; m.batch * hq * tq];
    for b in 0..m.batch {
        let (pos, mut k, v) = store.dequantize(layer, b);
        if m.plan.mode == Mode::PreRope {
            let rope = m.rope.as_ref().unwrap();
            for (i, row) in k.chunks_exact_mut(d).enumerate() {
                rope.apply(row, pos[i / hkv]);
            }
        }
        let n = pos.len();
        for h in 0..hq {
            let kh = h / gqa;
            for t in 0..tq {
                let qo = ((b * hq + h) * tq + t) * d;
                let qp = qpos[b * tq + t];
                let mut s = vec![f64::NEG_INFINITY; n];
                for (j, sj) in s.iter_mut().enumerate() {
                    let vis = (pos[j] as i64) <= qp as i64 - lag as i64
                        && window.is_none_or(|w| ((qp - pos[j]) as usize) < w);
                    if !vis {
                        continue;
                    }
                    let kk = &k[(j * hkv + kh) * d..(j * hkv + kh + 1) * d];
                    let mut dot: f64 =
                        (0..d).map(|c| q[qo + c] as f64 * kk[c] as f64).sum::<f64>() * scale as f64;
                    if let Some(cap) = softcap {
                        dot = cap as f64 * (dot / cap as f64).tanh();
                    }
                    *sj = dot;
                }
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if mx == f64::NEG_INFINITY {
                    continue;
                }
                let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let l: f64 = p.iter().sum();
                lse[qo / d] = (mx + l.ln()) as f32;
                for c in 0..d {
                    let acc: f64 = (0..n)
                        .map(|j| p[j] * v[(j * hkv + kh) * d + c] as f64)
                        .sum();
                    out[qo + c] = (acc / l) as f32;
                }
            }
        }
    }
    (out, lse)
}

#[derive(Debug, Clone)]
struct Case {
    hkv: usize,
    gqa: usize,
    d: usize,
    batch: usize,
    bits: u8,
    mode: Mode,
    group_heads: Option<usize>,
    layout: KeyLayout,
    residual: usize,
    group: Option<usize>,
    page: Option<usize>,
    chunks: Vec<usize>,
    tq: usize,
    protect: bool,
    valid: bool,
    window: Option<usize>,
    softcap: Option<f32>,
    /// Keys within this many positions of the query are masked.
    lag: usize,
    mixed_bits: bool,
    partial_rope: bool,
}

fn build(case: &Case, rng: &mut Rng) -> (KVStore, Vec<i32>) {
    let c = case;
    let plan = if c.mode == Mode::None {
        RotationPlan::identity(2, c.hkv, c.d).unwrap()
    } else {
        let mut p = RotationPlan::hadamard(2, c.hkv, c.d, c.mode, c.group_heads, true).unwrap();
        // A random calibrated-looking permutation per group.
        let n = p.group_len();
        for l in 0..2 {
            for g in p.key_perm[l].chunks_mut(n) {
                for i in (1..n).rev() {
                    g.swap(i, rng.below(i + 1));
                }
            }
        }
        p.key_clip[1] = 0.9;
        p
    };
    let cfg = QuantConfig {
        bits: c.bits,
        group_size: c.group,
        residual: c.residual,
        key_layout: c.layout,
        page_tokens: c.page,
        ..Default::default()
    };
    let rope = Some(rope_for(c.d, c.partial_rope));
    let mut store = KVStore::new(2, c.batch, c.hkv, c.d, cfg, plan, rope).unwrap();
    let mut next = vec![0i64; c.batch];
    for &t in &c.chunks {
        let ch = chunk(rng, (c.batch, c.hkv, t, c.d), &mut next, c.valid, None);
        let (k, v, positions) = (&ch.k, &ch.v, &ch.pos);
        let (valid, protect, bits) = (&ch.valid, &ch.protect, &ch.bits);
        let kv = View4::contiguous("k", Data::F32(k), [c.batch, c.hkv, t, c.d]).unwrap();
        let vv = View4::contiguous("v", Data::F32(v), [c.batch, c.hkv, t, c.d]).unwrap();
        for layer in 0..2 {
            store
                .append(
                    layer,
                    &AppendArgs {
                        k: kv,
                        v: vv,
                        positions: Some(positions),
                        protect: c.protect.then_some(&protect[..]),
                        valid: c.valid.then_some(&valid[..]),
                        bits: c.mixed_bits.then_some(&bits[..]),
                    },
                )
                .unwrap();
        }
    }
    let mut qpos = Vec::new();
    for nb in &next {
        for t in 0..c.tq {
            qpos.push((nb - c.tq as i64 + t as i64).max(0) as i32);
        }
    }
    (store, qpos)
}

fn check(case: &Case, seed: u64) {
    let mut rng = Rng(seed | 1);
    let (store, qpos) = build(case, &mut rng);
    let hq = case.hkv * case.gqa;
    let q = rng.vec(case.batch * hq * case.tq * case.d, 1.0);
    let scale = 0.7 / (case.d as f32).sqrt();
    for layer in 0..2 {
        let (want, want_lse) = reference(
            &store,
            layer,
            &q,
            hq,
            case.tq,
            &qpos,
            scale,
            case.window,
            case.softcap,
            case.lag,
        );
        for &level in &available_levels() {
            let mut got = vec![0f32; want.len()];
            let qv =
                View4::contiguous("q", Data::F32(&q), [case.batch, hq, case.tq, case.d]).unwrap();
            let args = AttendArgs {
                q: qv,
                positions: None,
                causal: true,
                scale: Some(scale),
                window: case.window,
                softcap: case.softcap,
                lag: case.lag,
            };
            store
                .attend_at(level, layer, &args, &mut OutData::F32(&mut got), None)
                .unwrap();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 2e-4,
                "{case:?} seed {seed} layer {layer} {level:?}: max error {worst}"
            );
            if level == simd::level() {
                let mut lse = vec![0f32; want_lse.len()];
                store
                    .attend_lse(layer, &args, &mut OutData::F32(&mut got), &mut lse)
                    .unwrap();
                for (i, (g, w)) in lse.iter().zip(&want_lse).enumerate() {
                    let ok = if *w == f32::NEG_INFINITY {
                        *g == f32::NEG_INFINITY
                    } else {
                        (g - w).abs() < 1e-4 * w.abs().max(1.0)
                    };
                    assert!(
                        ok,
                        "{case:?} seed {seed} layer {layer}: lse[{i}] {g} != {w}"
                    );
                }
            }
        }
    }
}

fn base() -> Case {
    Case {
        hkv: 2,
        gqa: 2,
        d: 64,
        batch: 2,
        bits: 2,
        mode: Mode::PreRope,
        group_heads: None,
        layout: KeyLayout::PerToken,
        residual: 0,
        group: None,
        page: None,
        chunks: vec![37, 1, 1],
        tq: 1,
        protect: false,
        valid: false,
        window: None,
        softcap: None,
        lag: 0,
        mixed_bits: false,
        partial_rope: false,
    }
}

#[test]
fn every_mode_and_bit_width() {
    let mut seed = 1;
    for mode in [Mode::PreRope, Mode::PostRope, Mode::None] {
        for bits in [2u8, 3, 4, 8, 16] {
            seed += 1;
            check(
                &Case {
                    mode,
                    bits,
                    ..base()
                },
                seed,
            );
        }
    }
}

#[test]
fn gqa_ratios_head_dims_and_groups() {
    let mut seed = 100;
    for (hkv, gqa, d, gh) in [
        (1, 1, 64, None),
        (3, 3, 64, None),
        (2, 8, 128, Some(1)),
        (1, 5, 256, None),
        (4, 2, 32, Some(2)),
    ] {
        for mode in [Mode::PreRope, Mode::PostRope] {
            seed += 1;
            check(
                &Case {
                    hkv,
                    gqa,
                    d,
                    mode,
                    group_heads: gh,
                    chunks: vec![70, 3],
                    ..base()
                },
                seed,
            );
        }
    }
}

#[test]
fn per_channel_keys_recent_window_and_pages() {
    let mut seed = 200;
    for (layout, residual, page) in [
        (KeyLayout::PerChannel, 0, None),
        (KeyLayout::PerChannel, 32, None),
        (KeyLayout::PerToken, 16, None),
        (KeyLayout::PerToken, 5, Some(32)),
        (KeyLayout::PerChannel, 7, Some(64)),
    ] {
        for bits in [2u8, 4] {
            seed += 1;
            check(
                &Case {
                    layout,
                    residual,
                    page,
                    bits,
                    chunks: vec![50, 30, 1, 1, 1],
                    ..base()
                },
                seed,
            );
        }
    }
}

#[test]
fn protect_valid_mixed_bits_window_softcap_multi_token() {
    let mut seed = 300;
    let cases = [
        Case {
            protect: true,
            valid: true,
            ..base()
        },
        Case {
            mixed_bits: true,
            residual: 4,
            chunks: vec![45, 2],
            ..base()
        },
        Case {
            window: Some(9),
            tq: 4,
            ..base()
        },
        Case {
            softcap: Some(1.5),
            tq: 3,
            mode: Mode::PostRope,
            ..base()
        },
        Case {
            tq: 19,
            chunks: vec![100],
            protect: true,
            ..base()
        },
        Case {
            group: Some(16),
            bits: 3,
            ..base()
        },
        Case {
            partial_rope: true,
            ..base()
        },
        Case {
            batch: 3,
            valid: true,
            mixed_bits: true,
            layout: KeyLayout::PerChannel,
            chunks: vec![80, 1],
            ..base()
        },
        // Recent keys masked (the hf prefill's older part): rows whose keys are all recent
        // see nothing (output 0, lse -inf); with a window, with per-channel keys.
        Case {
            tq: 37,
            chunks: vec![37],
            lag: 5,
            residual: 8,
            ..base()
        },
        Case {
            tq: 23,
            chunks: vec![50, 23],
            lag: 32,
            window: Some(40),
            protect: true,
            gqa: 3,
            ..base()
        },
        Case {
            tq: 9,
            chunks: vec![70, 9],
            lag: 3,
            layout: KeyLayout::PerChannel,
            residual: 32,
            mode: Mode::PostRope,
            valid: true,
            ..base()
        },
    ];
    for c in cases {
        seed += 1;
        check(&c, seed);
    }
}

#[test]
fn identity_store_matches_reference_quantizer_exactly() {
    let (hkv, d, t) = (2, 64, 10);
    let mut rng = Rng(77);
    let k = rng.vec(hkv * t * d, 3.0);
    let v = rng.vec(hkv * t * d, 3.0);
    for bits in [2u8, 3, 4, 8] {
        for group in [16usize, 64] {
            let cfg = QuantConfig {
                bits,
                group_size: Some(group),
                ..Default::default()
            };
            let plan = RotationPlan::identity(1, hkv, d).unwrap();
            let mut s = KVStore::new(1, 1, hkv, d, cfg, plan, None).unwrap();
            let kv = View4::contiguous("k", Data::F32(&k), [1, hkv, t, d]).unwrap();
            let vv = View4::contiguous("v", Data::F32(&v), [1, hkv, t, d]).unwrap();
            let args = AppendArgs {
                k: kv,
                v: vv,
                positions: None,
                protect: None,
                valid: None,
                bits: None,
            };
            s.append(0, &args).unwrap();
            let (_, kd, vd) = s.dequantize(0, 0);
            for (src, got) in [(&k, &kd), (&v, &vd)] {
                for h in 0..hkv {
                    for ti in 0..t {
                        let x = &src[(h * t + ti) * d..(h * t + ti + 1) * d];
                        for g0 in (0..d).step_by(group) {
                            let (codes, sc, z) = quantize_group_ref(&x[g0..g0 + group], bits, 1.0);
                            for (i, c) in codes.iter().enumerate() {
                                let want = *c as f32 * f16_to_f32(sc) + f16_to_f32(z);
                                assert_eq!(got[ti * hkv * d + h * d + g0 + i], want, "bits {bits}");
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn reorder_truncate_and_accounting() {
    let mut rng = Rng(5);
    let c = Case {
        batch: 3,
        chunks: vec![70, 1],
        residual: 3,
        ..base()
    };
    let (mut store, _) = build(&c, &mut rng);
    let before: Vec<_> = (0..3).map(|b| store.dequantize(0, b)).collect();
    let bytes = store.nbytes();
    store.reorder(&[2, 2, 0]).unwrap();
    assert!(store.dequantize(0, 0) == before[2]);
    assert!(store.dequantize(0, 1) == before[2]);
    assert!(store.dequantize(0, 2) == before[0]);
    assert!(store.nbytes() < bytes, "shared pages are counted once");
    // Appending to one of two sharers copies only its open pages.
    let k = rng.vec(3 * 2 * 64, 1.0);
    let kv = View4::contiguous("k", Data::F32(&k), [3, 2, 1, 64]).unwrap();
    let only_first = [true, false, false];
    let args = AppendArgs {
        k: kv,
        v: kv,
        positions: None,
        protect: None,
        valid: Some(&only_first),
        bits: None,
    };
    store.append(0, &args).unwrap();
    let (p0, ..) = store.dequantize(0, 0);
    assert_eq!(p0.len(), before[2].0.len() + 1);
    assert!(
        store.dequantize(0, 1) == before[2],
        "the other sharer is untouched"
    );
    store.truncate(&[40]).unwrap();
    for b in 0..3 {
        let (pos, ..) = store.dequantize(0, b);
        assert_eq!(pos.len(), 40);
        assert!(pos.iter().all(|&p| p < 40));
    }
    // Truncated tokens keep their values.
    let (pos, k2, _) = store.dequantize(0, 1);
    let (pos0, k0, _) = &before[2];
    for (i, p) in pos.iter().enumerate() {
        let j = pos0.iter().position(|x| x == p).unwrap();
        assert_eq!(&k2[i * 128..(i + 1) * 128], &k0[j * 128..(j + 1) * 128]);
    }
    assert!(store.reorder(&[0, 1]).is_err());
    assert!(store.reorder(&[0, 1, 3]).is_err());
    // 2.25 bits + positions for group 128 of 8 heads of 128 channels.
    let cfg = QuantConfig::default();
    let plan = RotationPlan::identity(1, 8, 128).unwrap();
    let mut s = KVStore::new(1, 1, 8, 128, cfg, plan, None).unwrap();
    let k = rng.vec(8 * 128 * 128, 1.0);
    let kv = View4::contiguous("k", Data::F32(&k), [1, 8, 128, 128]).unwrap();
    let args = AppendArgs {
        k: kv,
        v: kv,
        positions: None,
        protect: None,
        valid: None,
        bits: None,
    };
    s.append(0, &args).unwrap();
    let bpe = s.bits_per_element();
    assert!((bpe - (2.25 + 5.0 * 8.0 / 2048.0)).abs() < 1e-9, "{bpe}");
    assert_eq!(s.nbytes(), 2 * s.meta.layout(2).total);
}

#[test]
fn bad_inputs_leave_the_store_unchanged() {
    let mut rng = Rng(9);
    let (mut store, _) = build(&base(), &mut rng);
    let before = store.dequantize(0, 0);
    let k = rng.vec(2 * 2 * 3 * 64, 1.0);
    let mut bad = k.clone();
    bad[100] = f32::NAN;
    let kv = View4::contiguous("k", Data::F32(&k), [2, 2, 3, 64]).unwrap();
    let badv = View4::contiguous("k", Data::F32(&bad), [2, 2, 3, 64]).unwrap();
    let wrong = View4::contiguous("k", Data::F32(&k), [2, 3, 2, 64]).unwrap();
    let ok = AppendArgs {
        k: kv,
        v: kv,
        positions: None,
        protect: None,
        valid: None,
        bits: None,
    };
    let errs = [
        store.append(0, &AppendArgs { k: badv, ..ok }).unwrap_err(),
        store.append(0, &AppendArgs { v: wrong, ..ok }).unwrap_err(),
        store
            .append(
                0,
                &AppendArgs {
                    positions: Some(&[1, 2]),
                    ..ok
                },
            )
            .unwrap_err(),
        store
            .append(
                0,
                &AppendArgs {
                    positions: Some(&[1, -2, 3]),
                    ..ok
                },
            )
            .unwrap_err(),
        store
            .append(
                0,
                &AppendArgs {
                    bits: Some(&[5; 6]),
                    ..ok
                },
            )
            .unwrap_err(),
        store
            .append(
                0,
                &AppendArgs {
                    protect: Some(&[true; 5]),
                    ..ok
                },
            )
            .unwrap_err(),
    ];
    for (e, arg) in errs
        .iter()
        .zip(["k", "v", "positions", "positions", "bits", "protect"])
    {
        assert!(e.to_string().starts_with(arg), "{e}");
    }
    assert!(
        store.dequantize(0, 0) == before,
        "a failed append changed the store"
    );
    assert!(store.check_layer(2).is_err() && store.check_layer(-1).is_err());
    assert!(View4::new("q", Data::F32(&k), [2, 2, 3, 64], [10000, 1, 1, 1]).is_err());
}
