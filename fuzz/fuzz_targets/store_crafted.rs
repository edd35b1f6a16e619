//! Edits of a real saved store that keep its checksums right, so that they reach the checks
//! behind them: the header's fields, the pages' bytes, the plan and RoPE tensors.
//! `data[0]`: which sample and what to edit; `data[1]`: which tensor; the rest: an edit
//! script (`rotatekv_fuzz::edit`). An empty script must load back the same bytes.
#![no_main]
use std::collections::HashMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rotatekv::io::fnv1a64;
use rotatekv::persist::{from_bytes, to_bytes};
use rotatekv::KeyLayout;
use rotatekv_fuzz::{canonical, edit, exercise, join, sample_store, split, Tensors};

type Sample = (Vec<u8>, HashMap<String, String>, Tensors);

fn samples() -> &'static [Sample; 2] {
    static S: OnceLock<[Sample; 2]> = OnceLock::new();
    S.get_or_init(|| {
        [KeyLayout::PerToken, KeyLayout::PerChannel].map(|kl| {
            let bytes = to_bytes(&sample_store(kl), "sample").expect("save");
            let (meta, tensors) = split(&bytes);
            (bytes, meta, tensors)
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let (Some(&sel), Some(&which)) = (data.first(), data.get(1)) else {
        return;
    };
    let script = &data[2..];
    let (raw, meta, tensors) = &samples()[(sel & 1) as usize];
    let bytes = match (sel >> 1) % 3 {
        // The store header (JSON), with its checksum recomputed.
        0 => {
            let mut meta = meta.clone();
            let mut h = meta["store"].clone().into_bytes();
            edit(&mut h, script);
            let h = String::from_utf8_lossy(&h).into_owned();
            meta.insert(
                "store_checksum".into(),
                format!("{:016x}", fnv1a64(h.as_bytes())),
            );
            meta.insert("store".into(), h);
            join(meta, tensors)
        }
        // One tensor's bytes, with its checksum recomputed.
        1 => {
            let mut meta = meta.clone();
            let mut tensors = tensors.clone();
            let i = which as usize % tensors.len();
            let t = &mut tensors[i];
            edit(&mut t.3, script);
            // A truncated tensor keeps the file well formed: its shape follows its bytes.
            let elem =
                t.3.len() / t.2.iter().skip(1).product::<usize>().max(1) / (t.1.bitsize() / 8);
            t.2[0] = elem.min(t.2[0]);
            let keep = t.2.iter().product::<usize>() * (t.1.bitsize() / 8);
            t.3.truncate(keep);
            let mut sums: HashMap<String, String> =
                serde_json::from_str(&meta["checksums"]).expect("checksums");
            sums.insert(t.0.clone(), format!("{:016x}", fnv1a64(&t.3)));
            meta.insert(
                "checksums".into(),
                serde_json::to_string(&sums).expect("json"),
            );
            join(meta, &tensors)
        }
        // The raw file: checksums must catch what the format does not.
        _ => {
            let mut b = raw.clone();
            edit(&mut b, script);
            b
        }
    };
    match from_bytes(&bytes, "fuzz") {
        Ok(store) => {
            exercise(&store);
            if script.is_empty() {
                let again = to_bytes(&store, "again").expect("save");
                assert!(
                    canonical(&again) == canonical(raw),
                    "the sample changed on reload"
                );
            }
        }
        Err(e) => assert!(
            !script.is_empty(),
            "the unedited sample failed to load: {e}"
        ),
    }
});
