//! Criterion benches of the CPU kernels.
//!
//! * `fwht`: Hadamard transforms, column blocks `[n][64]` and single vectors; throughput in
//!   bytes of f32 data transformed.
//! * `append`: quantizing 512 tokens of 8 KV heads x 128 into a fresh store; throughput in
//!   bytes of f32 input (K and V).
//! * `attend`: decode (one query token, 32 query / 8 KV heads of 128) over a filled store;
//!   throughput in bytes of packed store read (`KVStore::nbytes`).
//!
//! Sample counts and times are kept small so that `cargo bench --bench kernels` finishes in
//! a few minutes on a 2-core machine; pass criterion options (e.g. `-- attend`) to select.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, BenchmarkId, Criterion,
    SamplingMode, Throughput,
};
use rotatekv::{
    AppendArgs, AttendArgs, Data, Hadamard, KVStore, Mode, OutData, QuantConfig, Rope,
    RotationPlan, View4,
};

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

/// Deterministic uniform values in `[-amp, amp)` (xorshift64).
fn rand_vec(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

/// Keys with a few outlier channels, as real keys have (what rotation is there for).
fn keys(t: usize, seed: u64) -> Vec<f32> {
    let mut k = rand_vec(HKV * t * D, seed, 1.0);
    for row in k.chunks_exact_mut(D) {
        row[5] *= 12.0;
        row[77] += 6.0;
    }
    k
}

fn rope() -> Rope {
    let inv: Vec<f32> = (0..D / 2)
        .map(|i| 500_000f32.powf(-((2 * i) as f32) / D as f32))
        .collect();
    Rope::new(inv, 1.0, D).expect("rope")
}

/// A one-layer, batch-1 store of `bits` in `mode` (`None`: identity plan).
fn new_store(bits: u8, mode: Mode) -> KVStore {
    let plan = match mode {
        Mode::None => RotationPlan::identity(1, HKV, D),
        m => RotationPlan::hadamard(1, HKV, D, m, None, true),
    }
    .expect("plan");
    let rope = (mode == Mode::PreRope).then(rope);
    let cfg = QuantConfig {
        bits,
        ..QuantConfig::default()
    };
    KVStore::new(1, 1, HKV, D, cfg, plan, rope).expect("store")
}

/// Appends `[1, HKV, t, D]` keys and values.
fn append(store: &mut KVStore, k: &[f32], v: &[f32], t: usize) {
    let shape = [1, HKV, t, D];
    let args = AppendArgs {
        k: View4::contiguous("k", Data::F32(k), shape).expect("k"),
        v: View4::contiguous("v", Data::F32(v), shape).expect("v"),
        positions: None,
        protect: None,
        valid: None,
        bits: None,
    };
    store.append(0, &args).expect("append");
}

fn configure(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

fn bench_fwht(c: &mut Criterion) {
    let mut g = c.benchmark_group("fwht");
    configure(&mut g);
    const W: usize = 64;
    for n in [128usize, 192, 1024, 4096] {
        let h = Hadamard::new(n).expect("hadamard");
        let mut x = rand_vec(n * W, n as u64, 1.0);
        g.throughput(Throughput::Bytes((n * W * 4) as u64));
        g.bench_function(BenchmarkId::new("forward_cols_w64", n), |b| {
            b.iter(|| h.forward_cols(black_box(&mut x), W))
        });
    }
    for n in [128usize, 32768] {
        let h = Hadamard::new(n).expect("hadamard");
        let mut x = rand_vec(n, n as u64 + 1, 1.0);
        g.throughput(Throughput::Bytes((n * 4) as u64));
        g.bench_function(BenchmarkId::new("forward", n), |b| {
            b.iter(|| h.forward(black_box(&mut x)))
        });
    }
    g.finish();
}

fn bench_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("append");
    configure(&mut g);
    g.sampling_mode(SamplingMode::Flat);
    const T: usize = 512;
    let k = keys(T, 1);
    let v = rand_vec(HKV * T * D, 2, 1.0);
    g.throughput(Throughput::Bytes((2 * HKV * T * D * 4) as u64));
    for bits in [2u8, 4] {
        for mode in [Mode::PreRope, Mode::PostRope] {
            let id = BenchmarkId::new(format!("{bits}bit_{}", mode.as_str()), T);
            g.bench_function(id, |b| {
                b.iter_batched_ref(
                    || new_store(bits, mode),
                    |s| append(s, black_box(&k), black_box(&v), T),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn bench_attend(c: &mut Criterion) {
    let mut g = c.benchmark_group("attend");
    configure(&mut g);
    g.sampling_mode(SamplingMode::Flat);
    const CHUNK: usize = 4096;
    let q = rand_vec(HQ * D, 3, 1.0);
    let qv = View4::contiguous("q", Data::F32(&q), [1, HQ, 1, D]).expect("q");
    let args = AttendArgs {
        q: qv,
        positions: None,
        causal: true,
        scale: None,
        window: None,
        softcap: None,
        lag: 0,
    };
    let mut out = vec![0f32; HQ * D];
    for ctx in [4096usize, 16384] {
        for (name, bits, mode) in [
            ("2bit_post_rope", 2u8, Mode::PostRope),
            ("2bit_pre_rope", 2, Mode::PreRope),
            ("16bit", 16, Mode::None),
        ] {
            let mut store = new_store(bits, mode);
            for (i, t0) in (0..ctx).step_by(CHUNK).enumerate() {
                let t = CHUNK.min(ctx - t0);
                let k = keys(t, 10 + i as u64);
                let v = rand_vec(HKV * t * D, 1000 + i as u64, 1.0);
                append(&mut store, &k, &v, t);
            }
            g.throughput(Throughput::Bytes(store.nbytes() as u64));
            g.bench_function(BenchmarkId::new(name, ctx), |b| {
                b.iter(|| {
                    let mut o = OutData::F32(&mut out);
                    black_box(&store).attend(0, &args, &mut o).expect("attend");
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_fwht, bench_append, bench_attend);
criterion_main!(benches);
