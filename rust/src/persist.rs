//! Saving and loading a whole store as one safetensors file.
//!
//! Tensors: `page.{i}` (u8, the page's bytes exactly as in memory, see [`crate::page`]),
//! `plan.key_perm` (i32), `plan.key_clip`, `plan.value_clip` (f32), and `rope.inv_freq` (f32)
//! when the store has RoPE. Metadata (`__metadata__`): `format = "rotatekv.store"`,
//! `format_version = "1"`, `store` (JSON: dimensions, settings, plan fields, RoPE scaling, and
//! per sequence its `next_pos` and its pages as `[index, bits, start, len, closed, window]`),
//! and `checksums` (JSON: FNV-1a 64 of every tensor's bytes, hex). `load` verifies the
//! checksums, every page's size against its layout, and every header field, and raises
//! `Format` errors naming the file and the problem; it never returns a damaged store.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::config::{KeyLayout, QuantConfig};
use crate::error::{Error, Result};
use crate::format::{class_of, FpFormat, Layout};
use crate::io::{fnv1a64, write_atomic};
use crate::page::Page;
use crate::rope::Rope;
use crate::rotation::{Mode, RotationPlan};
use crate::store::{KVStore, Seq};

const FORMAT: &str = "rotatekv.store";
const VERSION: &str = "1";

/// Writes `store` to `path` atomically.
pub fn save(store: &KVStore, path: &Path) -> Result<()> {
    let ps = path.display().to_string();
    write_atomic(path, &to_bytes(store, &ps)?)
}

/// The bytes [`save`] writes; `name` labels errors.
pub fn to_bytes(store: &KVStore, name: &str) -> Result<Vec<u8>> {
    let ps = name;
    let m = &store.meta;
    let mut blobs: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut seqs = Vec::new();
    for (l, layer) in store.layers.iter().enumerate() {
        for (b, seq) in layer.iter().enumerate() {
            let mut pages = Vec::new();
            for (w, list) in [
                (false, seq.pages.iter().collect::<Vec<_>>()),
                (true, seq.window.iter().collect()),
            ] {
                for p in list {
                    let i = blobs.len();
                    blobs.push((
                        format!("page.{i}"),
                        safetensors::Dtype::U8,
                        vec![p.nbytes()],
                        p.bytes().to_vec(),
                    ));
                    pages.push(json!([i, p.bits, p.start, p.len, p.closed, w]));
                }
            }
            seqs.push(json!({"layer": l, "seq": b, "next_pos": seq.next_pos, "pages": pages}));
        }
    }
    let plan = &m.plan;
    let total = plan.num_kv_heads * plan.head_dim;
    let perm: Vec<u8> = plan
        .key_perm
        .iter()
        .flatten()
        .flat_map(|&v| (v as i32).to_le_bytes())
        .collect();
    blobs.push((
        "plan.key_perm".into(),
        safetensors::Dtype::I32,
        vec![plan.num_layers, total],
        perm,
    ));
    let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    blobs.push((
        "plan.key_clip".into(),
        safetensors::Dtype::F32,
        vec![plan.num_layers],
        f32b(&plan.key_clip),
    ));
    blobs.push((
        "plan.value_clip".into(),
        safetensors::Dtype::F32,
        vec![plan.num_layers],
        f32b(&plan.value_clip),
    ));
    if let Some(r) = &m.rope {
        blobs.push((
            "rope.inv_freq".into(),
            safetensors::Dtype::F32,
            vec![r.half()],
            f32b(&r.inv_freq),
        ));
    }
    let c = &m.cfg;
    let header = json!({
        "num_layers": m.num_layers, "batch": m.batch, "heads": m.heads, "head_dim": m.d,
        "bits": c.bits, "value_bits": c.value_bits, "group_size": m.group, "key_clip": c.key_clip, "value_clip": c.value_clip,
        "residual": c.residual, "key_layout": c.key_layout.as_str(), "page_tokens": m.cap,
        "fp_format": c.fp_format.as_str(),
        "plan": {"mode": plan.mode.as_str(), "group_heads": plan.group_heads, "rotate_values": plan.rotate_values},
        "rope_scaling": m.rope.as_ref().map(|r| r.scaling),
        "max_tokens": m.max_tokens,
        "seqs": seqs,
    });
    let sums: std::collections::BTreeMap<String, String> = blobs
        .iter()
        .map(|(n, _, _, d)| (n.clone(), format!("{:016x}", fnv1a64(d))))
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("format_version".to_string(), VERSION.to_string());
    let header = header.to_string();
    meta.insert(
        "store_checksum".to_string(),
        format!("{:016x}", fnv1a64(header.as_bytes())),
    );
    meta.insert("store".to_string(), header);
    meta.insert(
        "checksums".to_string(),
        serde_json::to_string(&sums).unwrap_or_default(),
    );
    let mut views = Vec::new();
    for (n, dt, shape, data) in &blobs {
        let v = safetensors::tensor::TensorView::new(*dt, shape.clone(), data)
            .map_err(|e| Error::format(ps, e.to_string()))?;
        views.push((n.clone(), v));
    }
    safetensors::tensor::serialize(views, Some(meta)).map_err(|e| Error::format(ps, e.to_string()))
}

/// Reads a store written by [`save`].
pub fn load(path: &Path) -> Result<KVStore> {
    let ps = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| Error::io(&ps, &e))?;
    from_bytes(&bytes, &ps)
}

/// Parses the bytes of a saved store; `name` (the file) labels errors. Every field and every
/// checksum is verified, so arbitrary bytes give a `Format` error, never a damaged store.
pub fn from_bytes(bytes: &[u8], name: &str) -> Result<KVStore> {
    let ps = name;
    let bad = |msg: String| Error::format(ps, msg);
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad("not a rotatekv store (metadata 'format')".into()));
    }
    match meta.get("format_version").map(String::as_str) {
        Some(VERSION) => {}
        v => {
            return Err(bad(format!(
                "unsupported store format_version {v:?} (this build reads {VERSION})"
            )))
        }
    }
    let sums: HashMap<String, String> =
        serde_json::from_str(meta.get("checksums").map_or("", |s| s.as_str()))
            .map_err(|_| bad("metadata 'checksums' is missing or not JSON".into()))?;
    let header = meta.get("store").map_or("", |s| s.as_str());
    if meta.get("store_checksum") != Some(&format!("{:016x}", fnv1a64(header.as_bytes()))) {
        return Err(bad(
            "checksum mismatch in the store header (file damaged)".into()
        ));
    }
    let h: Value = serde_json::from_str(header)
        .map_err(|_| bad("metadata 'store' is missing or not JSON".into()))?;
    let tensor = |name: &str| -> Result<Vec<u8>> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("missing tensor '{name}'")))?;
        let want = sums
            .get(name)
            .ok_or_else(|| bad(format!("no checksum for '{name}'")))?;
        let got = format!("{:016x}", fnv1a64(t.data()));
        if &got != want {
            return Err(bad(format!("checksum mismatch in '{name}' (file damaged)")));
        }
        Ok(t.data().to_vec())
    };
    let uint = |v: &Value, k: &str| -> Result<usize> {
        v.get(k)
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| bad(format!("header field '{k}'")))
    };
    let num_layers = uint(&h, "num_layers")?;
    let batch = uint(&h, "batch")?;
    let heads = uint(&h, "heads")?;
    let d = uint(&h, "head_dim")?;
    // The same limits as KVStore::new, checked before any size arithmetic below.
    if !(1..=1 << 16).contains(&num_layers)
        || !(1..=1 << 20).contains(&batch)
        || !(1..=4096).contains(&heads)
        || !(1..=4096).contains(&d)
        || num_layers * batch > 1 << 22
    {
        return Err(bad(format!(
            "implausible store dimensions: {num_layers} layers, batch {batch}, {heads} heads of {d}"
        )));
    }
    let s = |k: &str| -> Result<String> {
        h.get(k)
            .and_then(Value::as_str)
            .map(String::from)
            .ok_or_else(|| bad(format!("header field '{k}'")))
    };
    let clip = |k: &str| h.get(k).and_then(Value::as_f64).map(|x| x as f32);
    let cfg = QuantConfig {
        bits: uint(&h, "bits")? as u8,
        // Absent in files written before keys and values had their own widths.
        value_bits: h.get("value_bits").and_then(Value::as_u64).map(|v| v as u8),
        group_size: Some(uint(&h, "group_size")?),
        key_clip: clip("key_clip"),
        value_clip: clip("value_clip"),
        residual: uint(&h, "residual")?,
        key_layout: KeyLayout::parse(&s("key_layout")?).map_err(|e| bad(e.to_string()))?,
        page_tokens: Some(uint(&h, "page_tokens")?),
        fp_format: match s("fp_format")?.as_str() {
            "float16" => FpFormat::F16,
            "bfloat16" => FpFormat::BF16,
            o => return Err(bad(format!("fp_format {o:?}"))),
        },
    };
    let ph = h
        .get("plan")
        .ok_or_else(|| bad("header field 'plan'".into()))?;
    let mode = Mode::parse(ph.get("mode").and_then(Value::as_str).unwrap_or("?"))
        .map_err(|e| bad(e.to_string()))?;
    let total = heads * d;
    let perm = tensor("plan.key_perm")?;
    if perm.len() != num_layers * total * 4 {
        return Err(bad("tensor 'plan.key_perm' has the wrong size".into()));
    }
    let f32s = |b: Vec<u8>| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let plan = RotationPlan {
        num_layers,
        num_kv_heads: heads,
        head_dim: d,
        group_heads: uint(ph, "group_heads")?,
        mode,
        rotate_values: ph
            .get("rotate_values")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad("plan.rotate_values".into()))?,
        key_perm: perm
            .chunks_exact(4 * total.max(1))
            .map(|row| {
                row.chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
                    .collect()
            })
            .collect(),
        key_clip: f32s(tensor("plan.key_clip")?),
        value_clip: f32s(tensor("plan.value_clip")?),
    };
    let rope = match h.get("rope_scaling").and_then(Value::as_f64) {
        Some(sc) => Some(
            Rope::new(f32s(tensor("rope.inv_freq")?), sc as f32, d)
                .map_err(|e| bad(e.to_string()))?,
        ),
        None => None,
    };
    let mut store = KVStore::new(num_layers, batch, heads, d, cfg, plan, rope)
        .map_err(|e| bad(e.to_string()))?;
    let seqs = h
        .get("seqs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("header field 'seqs'".into()))?;
    if seqs.len() != num_layers * batch {
        return Err(bad(format!(
            "{} sequences listed, expected {}",
            seqs.len(),
            num_layers * batch
        )));
    }
    let mut used = std::collections::HashSet::new();
    for sq in seqs {
        let (l, b) = (uint(sq, "layer")?, uint(sq, "seq")?);
        if l >= num_layers || b >= batch {
            return Err(bad(format!("sequence ({l}, {b}) out of range")));
        }
        let next_pos = sq
            .get("next_pos")
            .and_then(Value::as_i64)
            .filter(|p| (0..i32::MAX as i64).contains(p))
            .ok_or_else(|| bad("next_pos missing or out of range".into()))?;
        let mut seq = Seq::default();
        seq.next_pos = next_pos;
        for p in sq
            .get("pages")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("pages".into()))?
        {
            let f = p
                .as_array()
                .filter(|a| a.len() == 6)
                .ok_or_else(|| bad("page entry".into()))?;
            let num = |i: usize| {
                f[i].as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| bad("page entry field".into()))
            };
            let (idx, bits, start, len) = (num(0)?, num(1)?, num(2)?, num(3)?);
            let closed = f[4]
                .as_bool()
                .ok_or_else(|| bad("page closed flag".into()))?;
            let window = f[5]
                .as_bool()
                .ok_or_else(|| bad("page window flag".into()))?;
            if !used.insert(idx) {
                return Err(bad(format!("page {idx} listed twice")));
            }
            if u8::try_from(bits).ok().and_then(class_of).is_none() || (window && bits != 16) {
                return Err(bad(format!("page {idx}: bits {bits}")));
            }
            let lay = store.meta.layout(bits as u8).clone();
            if start > len || len > lay.cap {
                return Err(bad(format!(
                    "page {idx}: slots {start}..{len} outside 0..{}",
                    lay.cap
                )));
            }
            let data = tensor(&format!("page.{idx}"))?;
            if data.len() != lay.total {
                return Err(bad(format!(
                    "page {idx}: {} bytes, layout needs {}",
                    data.len(),
                    lay.total
                )));
            }
            let mut page = Page::from_bytes(&lay, &data);
            page.start = start;
            page.len = len;
            page.closed = closed;
            page.refresh_range();
            if page.positions()[start..len].iter().any(|&x| x < 0) {
                return Err(bad(format!("page {idx}: negative position")));
            }
            if bits < 16 {
                check_scales(&page, &lay).map_err(|m| bad(format!("page {idx}: {m}")))?;
            }
            if window
                && page.tags()[start..len]
                    .iter()
                    .any(|&t| t >= 16 || class_of(t).is_none())
            {
                return Err(bad(format!("page {idx}: a window tag is not a bit width")));
            }
            if window {
                seq.window.push_back(Arc::new(page));
            } else {
                seq.pages.push(Arc::new(page));
            }
        }
        store.layers[l][b] = seq;
    }
    // Absent in files written before capacities existed.
    let max_tokens = match h.get("max_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            uint(&h, "max_tokens").map_err(|_| bad(format!("header field 'max_tokens' = {v}")))?,
        ),
    };
    store
        .set_max_tokens(max_tokens)
        .map_err(|e| bad(e.to_string()))?;
    Ok(store)
}

fn check_scales(page: &Page, lay: &Layout) -> std::result::Result<(), String> {
    let ng = lay.d / lay.group;
    let k_len = if lay.per_channel { lay.d } else { ng * lay.cap };
    for h in 0..lay.heads {
        let base = lay.head(h);
        for (off, n) in [
            (lay.k_scale, k_len),
            (lay.k_zero, k_len),
            (lay.v_scale, ng * lay.cap),
            (lay.v_zero, ng * lay.cap),
        ] {
            if page
                .u16s(base + off, n)
                .iter()
                .any(|&x| x & 0x7c00 == 0x7c00)
            {
                return Err("non-finite scale or zero".into());
            }
        }
    }
    Ok(())
}
