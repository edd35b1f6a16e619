//! Shared pieces of the fuzz targets: sample stores and plans built from real calls, byte
//! edit scripts, and a walk over every read path of a loaded store.

use std::collections::HashMap;

use rotatekv::attend::AttendArgs;
use rotatekv::rotation::{Mode, RotationPlan};
use rotatekv::tensor::{Data, OutData, View4};
use rotatekv::Rope;
use rotatekv::{AppendArgs, KVStore, KeyLayout, QuantConfig};

/// Heads and head dim of the sample stores: small, so each run is fast.
pub const HKV: usize = 2;
/// Head dim of the sample stores.
pub const D: usize = 16;

/// Deterministic pseudo-random floats in [-2, 2).
pub fn floats(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// A two-layer, batch-2 store with every precision class, sinks, a recent window and
/// pre-RoPE keys, so that its saved bytes contain every kind of page.
pub fn sample_store(key_layout: KeyLayout) -> KVStore {
    let plan = RotationPlan::hadamard(2, HKV, D, Mode::PreRope, None, true).expect("plan");
    let inv: Vec<f32> = (0..D / 2)
        .map(|i| 10000f32.powf(-(2.0 * i as f32) / D as f32))
        .collect();
    let rope = Rope::new(inv, 1.0, D).expect("rope");
    let cfg = QuantConfig {
        bits: 2,
        residual: 4,
        key_layout,
        page_tokens: Some(32),
        ..QuantConfig::default()
    };
    let mut store = KVStore::new(2, 2, HKV, D, cfg, plan, Some(rope)).expect("store");
    let t = 40;
    let bits: Vec<u8> = (0..2 * t).map(|i| [2, 3, 4, 8, 16][i % 5]).collect();
    let protect: Vec<bool> = (0..2 * t).map(|i| i % 17 == 0).collect();
    for layer in 0..2 {
        let k = floats(2 * HKV * t * D, layer as u64 + 1);
        let v = floats(2 * HKV * t * D, layer as u64 + 7);
        let shape = [2, HKV, t, D];
        let args = AppendArgs {
            k: View4::contiguous("k", Data::F32(&k), shape).expect("k"),
            v: View4::contiguous("v", Data::F32(&v), shape).expect("v"),
            positions: None,
            protect: Some(&protect),
            valid: None,
            bits: Some(&bits),
        };
        store.append(layer, &args).expect("append");
    }
    store
}

/// Applies an edit script to `target`: each 3-byte record `(lo, hi, x)` XORs `x` into the
/// byte at `(hi << 8 | lo) % len`; a trailing single byte truncates to `len * b / 256`.
pub fn edit(target: &mut Vec<u8>, script: &[u8]) {
    if target.is_empty() {
        return;
    }
    let mut recs = script.chunks_exact(3);
    for r in recs.by_ref() {
        let at = (r[0] as usize | (r[1] as usize) << 8) % target.len();
        target[at] ^= r[2];
    }
    if let [b] = recs.remainder() {
        let n = target.len() * *b as usize / 256;
        target.truncate(n);
    }
}

/// Reads everything a loaded store offers: sizes, every sequence's tokens, and attention of
/// one query per sequence on every layer, with and without a window. Nothing may panic.
pub fn exercise(store: &KVStore) {
    let m = &store.meta;
    let _ = (store.nbytes(), store.payload_bytes(), store.total_tokens());
    let _ = store.bits_per_element();
    for layer in 0..m.num_layers {
        for b in 0..m.batch {
            let _ = store.dequantize(layer, b);
        }
        let hq = m.heads;
        let q = floats(m.batch * hq * m.d, 99);
        let mut out = vec![0f32; q.len()];
        for window in [None, Some(3)] {
            let args = AttendArgs {
                q: View4::contiguous("q", Data::F32(&q), [m.batch, hq, 1, m.d]).expect("q"),
                positions: None,
                causal: true,
                scale: None,
                window,
                softcap: None,
                lag: 0,
            };
            let _ = store.attend(layer, &args, &mut OutData::F32(&mut out));
        }
    }
}

/// Splits a safetensors file into its metadata and tensors `(name, dtype, shape, bytes)`.
pub type Tensors = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// Parses a file this crate wrote (the input is trusted: the sample's own bytes).
pub fn split(bytes: &[u8]) -> (HashMap<String, String>, Tensors) {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).expect("header");
    let st = safetensors::SafeTensors::deserialize(bytes).expect("file");
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let tensors = names
        .into_iter()
        .map(|n| {
            let t = st.tensor(&n).expect("tensor");
            (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())
        })
        .collect();
    (header.metadata().clone().unwrap_or_default(), tensors)
}

/// Writes a safetensors file back.
pub fn join(meta: HashMap<String, String>, tensors: &Tensors) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, dt, s, d)| {
            let v = safetensors::tensor::TensorView::new(*dt, s.clone(), d).expect("view");
            (n.clone(), v)
        })
        .collect();
    safetensors::tensor::serialize(views, Some(meta)).expect("serialize")
}

/// A saved file's content independent of the order of JSON maps (safetensors writes its
/// metadata from a `HashMap`, so the same store saves to equal content in varying order).
pub fn canonical(bytes: &[u8]) -> String {
    let (meta, tensors) = split(bytes);
    let meta: std::collections::BTreeMap<String, serde_json::Value> = meta
        .into_iter()
        .map(|(k, v)| {
            let j = serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v));
            (k, j)
        })
        .collect();
    let sums: Vec<u64> = tensors
        .iter()
        .map(|t| rotatekv::io::fnv1a64(&t.3))
        .collect();
    let shapes: Vec<_> = tensors.iter().map(|t| (&t.0, &t.2)).collect();
    format!(
        "{}|{shapes:?}|{sums:?}",
        serde_json::to_string(&meta).expect("json")
    )
}
