//! Sequences of store calls on a store of fuzzed settings, with two oracles: a call that
//! fails leaves the store's saved bytes unchanged, and a saved store loads back to the same
//! bytes. Data carries NaN, infinities and huge values; positions and masks are fuzzed.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rotatekv::attend::AttendArgs;
use rotatekv::format::FpFormat;
use rotatekv::persist::{from_bytes, to_bytes};
use rotatekv::rotation::{Mode, RotationPlan};
use rotatekv::tensor::{Data, OutData, View4};
use rotatekv::Rope;
use rotatekv::{AppendArgs, KVStore, KeyLayout, QuantConfig};
use rotatekv_fuzz::floats;

const L: usize = 2;
const B: usize = 2;
const H: usize = 2;
const D: usize = 16;

/// Reads bytes off the input, zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.byte() as usize % from.len()]
    }
}

fn new_store(inp: &mut Input) -> Option<KVStore> {
    let mode = inp.pick(&[Mode::None, Mode::PostRope, Mode::PreRope]);
    let plan = match mode {
        Mode::None => RotationPlan::identity(L, H, D),
        m => RotationPlan::hadamard(L, H, D, m, None, true),
    }
    .ok()?;
    let rope = (inp.byte() & 1 == 1 || mode == Mode::PreRope).then(|| {
        let inv = (0..D / 2)
            .map(|i| 10000f32.powf(-(2.0 * i as f32) / D as f32))
            .collect();
        Rope::new(inv, 1.0 + inp.byte() as f32 / 64.0, D).expect("rope")
    });
    let cfg = QuantConfig {
        bits: inp.pick(&[2, 3, 4, 8, 16]),
        // Some combinations are refused (16 with a quantized width): the store is then None.
        value_bits: inp.pick(&[None, Some(2), Some(4), Some(16)]),
        group_size: inp.pick(&[None, Some(8), Some(16)]),
        key_clip: inp.pick(&[None, Some(0.8), Some(1.0)]),
        value_clip: inp.pick(&[None, Some(0.9)]),
        residual: inp.byte() as usize % 9,
        key_layout: inp.pick(&[KeyLayout::PerToken, KeyLayout::PerChannel]),
        page_tokens: inp.pick(&[None, Some(32), Some(64)]),
        fp_format: inp.pick(&[FpFormat::F16, FpFormat::BF16]),
    };
    KVStore::new(L, B, H, D, cfg, plan, rope).ok()
}

fn data(inp: &mut Input, n: usize) -> Vec<f32> {
    let mut x = floats(n, inp.byte() as u64);
    let scale = inp.pick(&[1.0f32, 1e-30, 1e4, 7e4, 1e38]);
    x.iter_mut().for_each(|v| *v *= scale);
    // A few special values at fuzzed places.
    for _ in 0..inp.byte() % 4 {
        let at = inp.byte() as usize * 7 % n.max(1);
        if let Some(v) = x.get_mut(at) {
            *v = inp.pick(&[f32::NAN, f32::INFINITY, -f32::INFINITY, 0.0, -0.0]);
        }
    }
    x
}

fn positions(inp: &mut Input, n: usize) -> Option<Vec<i64>> {
    match inp.byte() % 4 {
        0 => None,
        1 => Some((0..n as i64).map(|i| i + inp.byte() as i64 * 8).collect()),
        2 => Some((0..n).map(|_| inp.byte() as i64 - 8).collect()),
        _ => Some(
            (0..n)
                .map(|_| [i64::MAX, i64::MIN, 1 << 31, 0][inp.byte() as usize % 4])
                .collect(),
        ),
    }
}

fn mask(inp: &mut Input, n: usize) -> Option<Vec<bool>> {
    (inp.byte() & 1 == 1).then(|| (0..n).map(|_| inp.byte() & 1 == 1).collect())
}

fn snapshot(s: &KVStore) -> Vec<u8> {
    to_bytes(s, "snapshot").expect("a store always saves")
}

fn same(a: &[u8], b: &[u8]) -> bool {
    rotatekv_fuzz::canonical(a) == rotatekv_fuzz::canonical(b)
}

fuzz_target!(|bytes: &[u8]| {
    let mut inp = Input(bytes);
    let Some(mut store) = new_store(&mut inp) else {
        return;
    };
    for _ in 0..12 {
        if inp.0.is_empty() {
            break;
        }
        let before = snapshot(&store);
        let layer = inp.byte() as usize % (L + 1); // L itself: a bad layer
        let ok = match inp.byte() % 6 {
            0 | 1 => {
                let t = inp.byte() as usize % 70;
                let bsz = inp.pick(&[B, B, 1]);
                let k = data(&mut inp, bsz * H * t * D);
                let v = data(&mut inp, bsz * H * t * D);
                let np = if inp.byte() & 1 == 1 { t } else { bsz * t };
                let pos = positions(&mut inp, np);
                let protect = mask(&mut inp, bsz * t);
                let valid = mask(&mut inp, bsz * t);
                let bits = (inp.byte() & 1 == 1).then(|| {
                    (0..bsz * t)
                        .map(|_| inp.pick(&[2u8, 3, 4, 8, 16, 5]))
                        .collect::<Vec<_>>()
                });
                let shape = [bsz, H, t, D];
                let args = AppendArgs {
                    k: View4::contiguous("k", Data::F32(&k), shape).expect("k"),
                    v: View4::contiguous("v", Data::F32(&v), shape).expect("v"),
                    positions: pos.as_deref(),
                    protect: protect.as_deref(),
                    valid: valid.as_deref(),
                    bits: bits.as_deref(),
                };
                layer < L && store.append(layer, &args).is_ok()
            }
            2 => {
                let tq = inp.byte() as usize % 5;
                let hq = inp.pick(&[H, 2 * H, 3]);
                let q = data(&mut inp, B * hq * tq * D);
                let pos = positions(&mut inp, B * tq);
                let args = AttendArgs {
                    q: View4::contiguous("q", Data::F32(&q), [B, hq, tq, D]).expect("q"),
                    positions: pos.as_deref(),
                    causal: inp.byte() & 1 == 1,
                    scale: inp.pick(&[None, Some(0.0), Some(f32::NAN), Some(1e30)]),
                    window: inp.pick(&[None, Some(0), Some(1), Some(40)]),
                    softcap: inp.pick(&[None, Some(50.0), Some(0.0), Some(-1.0)]),
                    lag: inp.pick(&[0, 0, 1, 40, usize::MAX]),
                };
                let mut out = vec![0f32; q.len()];
                let _ = layer < L
                    && store
                        .attend(layer, &args, &mut OutData::F32(&mut out))
                        .is_ok();
                true // attention never changes the store
            }
            3 => {
                let idx: Vec<i64> = (0..B).map(|_| inp.byte() as i64 % (B as i64 + 1)).collect();
                store.reorder(&idx).is_ok()
            }
            4 => {
                let lens: Vec<i64> = (0..inp.pick(&[1, B, 3]))
                    .map(|_| inp.byte() as i64 - 4)
                    .collect();
                store.truncate(&lens).is_ok()
            }
            _ => {
                let back = from_bytes(&before, "roundtrip").expect("a saved store loads");
                assert!(
                    same(&snapshot(&back), &before),
                    "save/load is not bit-exact"
                );
                rotatekv_fuzz::exercise(&back);
                true
            }
        };
        if !ok {
            assert!(
                same(&snapshot(&store), &before),
                "a failed call changed the store"
            );
        }
    }
    rotatekv_fuzz::exercise(&store);
});
