//! Plans: arbitrary bytes, and edits of a real plan saved as format version 1 (which has no
//! checksum, so edits reach every field check). A plan that loads must drive a store.
#![no_main]
use std::collections::HashMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rotatekv::rotation::{Mode, RotationPlan};
use rotatekv::tensor::{Data, View4};
use rotatekv::Rope;
use rotatekv::{AppendArgs, KVStore, QuantConfig};
use rotatekv_fuzz::{edit, exercise, floats, join, split, D, HKV};

fn sample() -> &'static Vec<u8> {
    static S: OnceLock<Vec<u8>> = OnceLock::new();
    S.get_or_init(|| {
        let plan = RotationPlan::hadamard(3, HKV, D, Mode::PreRope, None, true).expect("plan");
        let bytes = plan.to_bytes(&HashMap::new(), "sample").expect("save");
        let (mut meta, tensors) = split(&bytes);
        meta.insert("format_version".into(), "1".into());
        meta.remove("checksum");
        join(meta, &tensors)
    })
}

fn drive(plan: RotationPlan) {
    let (l, h, d) = (plan.num_layers, plan.num_kv_heads, plan.head_dim);
    if l * h * d > 1 << 12 {
        return; // Valid but too big to exercise quickly.
    }
    let rope = if plan.mode == Mode::PreRope {
        let inv = (0..d / 2).map(|i| 1.0 / (1.0 + i as f32)).collect();
        Some(Rope::new(inv, 1.0, d).expect("rope"))
    } else {
        None
    };
    let Ok(mut store) = KVStore::new(l, 1, h, d, QuantConfig::default(), plan, rope) else {
        return;
    };
    let t = 5;
    let k = floats(h * t * d, 3);
    let args = AppendArgs {
        k: View4::contiguous("k", Data::F32(&k), [1, h, t, d]).expect("k"),
        v: View4::contiguous("v", Data::F32(&k), [1, h, t, d]).expect("v"),
        positions: None,
        protect: None,
        valid: None,
        bits: None,
    };
    for layer in 0..l {
        store
            .append(layer, &args)
            .expect("a valid plan must take appends");
    }
    exercise(&store);
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, script)) = data.split_first() else {
        return;
    };
    let bytes = match sel % 4 {
        0 => script.to_vec(),
        1 => {
            let mut b = sample().clone();
            edit(&mut b, script);
            b
        }
        // One metadata value or one tensor of the sample, the file kept well formed.
        s => {
            let (mut meta, mut tensors) = split(sample());
            if s == 2 {
                let mut keys: Vec<String> = meta.keys().cloned().collect();
                keys.sort();
                let k = &keys[script.first().copied().unwrap_or(0) as usize % keys.len()];
                let mut v = meta[k].clone().into_bytes();
                edit(&mut v, script.get(1..).unwrap_or(&[]));
                meta.insert(k.clone(), String::from_utf8_lossy(&v).into_owned());
            } else {
                let i = script.first().copied().unwrap_or(0) as usize % tensors.len();
                let mut t = tensors[i].3.clone();
                let n = t.len();
                edit(&mut t, script.get(1..).unwrap_or(&[]));
                t.resize(n, 0);
                tensors[i].3 = t;
            }
            join(meta, &tensors)
        }
    };
    if let Ok((plan, _)) = RotationPlan::from_bytes(&bytes, "fuzz") {
        drive(plan);
    }
});
