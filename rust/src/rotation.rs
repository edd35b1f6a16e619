//! Rotation plans: how keys and values are rotated before quantization, per layer.
//!
//! Keys of `group_heads` consecutive KV heads are concatenated into one vector of
//! `n = group_heads * head_dim` channels, transformed by the orthonormal Hadamard `H_n`
//! (see [`crate::hadamard`]) and then permuted: `stored[j] = (H_n k)[perm[j]]`. The
//! permutation groups channels of similar magnitude into the same quantization group
//! (RotateKV's outlier-aware reordering); it is calibrated per layer and per head group.
//! Values, when rotated, use a per-head `H_{head_dim}` (a cross-head rotation would not
//! commute with GQA's per-head attention weights); the inverse is applied once to the
//! attention output.
//!
//! Modes:
//! * `pre_rope`: keys are appended before RoPE; the store applies RoPE inside attention.
//! * `post_rope`: keys arrive with RoPE applied; the store rotates keys (and, equivalently,
//!   queries) only.
//! * `none`: no Hadamard transform (the permutation still applies); used for plain
//!   round-to-nearest and KIVI baselines.

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::hadamard;

/// Where RoPE sits relative to the stored keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Keys stored before RoPE; the store applies RoPE at attention time.
    PreRope,
    /// Keys stored after RoPE (the caller applies it).
    PostRope,
    /// No rotation.
    None,
}

impl Mode {
    /// Parses `"pre_rope" | "post_rope" | "none"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "pre_rope" => Ok(Mode::PreRope),
            "post_rope" => Ok(Mode::PostRope),
            "none" => Ok(Mode::None),
            _ => Err(Error::value(
                "mode",
                "'pre_rope', 'post_rope' or 'none'",
                format!("{s:?}"),
            )),
        }
    }
    /// The name used in files and Python.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::PreRope => "pre_rope",
            Mode::PostRope => "post_rope",
            Mode::None => "none",
        }
    }
}

/// A per-layer rotation plan.
#[derive(Clone, Debug, PartialEq)]
pub struct RotationPlan {
    /// Layers.
    pub num_layers: usize,
    /// KV heads per layer.
    pub num_kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// KV heads whose keys share one Hadamard transform.
    pub group_heads: usize,
    /// RoPE placement.
    pub mode: Mode,
    /// Whether values are Hadamard-rotated per head.
    pub rotate_values: bool,
    /// `[layer][group * n + j]`: stored channel `j` of head group `group` is channel
    /// `perm[j]` of the transformed group vector (`n = group_heads * head_dim`).
    pub key_perm: Vec<Vec<u32>>,
    /// Clip ratio of key groups, per layer.
    pub key_clip: Vec<f32>,
    /// Clip ratio of value groups, per layer.
    pub value_clip: Vec<f32>,
}

impl RotationPlan {
    /// No rotation, identity permutations, clip 1.
    pub fn identity(num_layers: usize, num_kv_heads: usize, head_dim: usize) -> Result<Self> {
        let plan = RotationPlan {
            num_layers,
            num_kv_heads,
            head_dim,
            group_heads: 1,
            mode: Mode::None,
            rotate_values: false,
            key_perm: vec![identity_perm(num_kv_heads * head_dim, head_dim); num_layers],
            key_clip: vec![1.0; num_layers],
            value_clip: vec![1.0; num_layers],
        };
        plan.validate()?;
        Ok(plan)
    }

    /// Plain Hadamard plan. `group_heads = None` picks, for `pre_rope`, the largest divisor of
    /// `num_kv_heads` whose group size is a supported transform size; for `post_rope` 1 (so
    /// queries can be rotated instead of every key).
    pub fn hadamard(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        mode: Mode,
        group_heads: Option<usize>,
        rotate_values: bool,
    ) -> Result<Self> {
        let g = match group_heads {
            Some(g) => g,
            None if mode == Mode::PreRope => (1..=num_kv_heads)
                .rev()
                .find(|g| num_kv_heads.is_multiple_of(*g) && hadamard::supported(g * head_dim))
                .unwrap_or(1),
            None => 1,
        };
        let plan = RotationPlan {
            num_layers,
            num_kv_heads,
            head_dim,
            group_heads: g,
            mode,
            rotate_values,
            key_perm: vec![identity_perm(num_kv_heads * head_dim, g * head_dim); num_layers],
            key_clip: vec![1.0; num_layers],
            value_clip: vec![1.0; num_layers],
        };
        plan.validate()?;
        Ok(plan)
    }

    /// The plan of layer `l` alone (a one-layer plan; `l` must be a layer of this plan).
    pub fn layer(&self, l: usize) -> Self {
        RotationPlan {
            num_layers: 1,
            key_perm: vec![self.key_perm[l].clone()],
            key_clip: vec![self.key_clip[l]],
            value_clip: vec![self.value_clip[l]],
            ..self.clone_shape()
        }
    }

    fn clone_shape(&self) -> Self {
        RotationPlan {
            num_layers: self.num_layers,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            group_heads: self.group_heads,
            mode: self.mode,
            rotate_values: self.rotate_values,
            key_perm: Vec::new(),
            key_clip: Vec::new(),
            value_clip: Vec::new(),
        }
    }

    /// Channels of one head group.
    pub fn group_len(&self) -> usize {
        self.group_heads * self.head_dim
    }

    /// Head groups per layer.
    pub fn num_groups(&self) -> usize {
        self.num_kv_heads / self.group_heads
    }

    /// Whether a key Hadamard transform is used.
    pub fn rotates_keys(&self) -> bool {
        self.mode != Mode::None
    }

    /// Whether layer `l`'s permutation is the identity.
    pub fn perm_is_identity(&self, l: usize) -> bool {
        let n = self.group_len();
        self.key_perm[l]
            .iter()
            .enumerate()
            .all(|(i, &p)| p as usize == i % n)
    }

    /// Checks every invariant; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.num_layers == 0 {
            return Err(Error::value("num_layers", ">= 1", "0"));
        }
        if self.num_kv_heads == 0 {
            return Err(Error::value("num_kv_heads", ">= 1", "0"));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(8) {
            return Err(Error::value(
                "head_dim",
                "a positive multiple of 8",
                self.head_dim.to_string(),
            ));
        }
        if self.group_heads == 0 || !self.num_kv_heads.is_multiple_of(self.group_heads) {
            return Err(Error::value(
                "group_heads",
                format!("a divisor of num_kv_heads = {}", self.num_kv_heads),
                self.group_heads.to_string(),
            ));
        }
        if self.rotates_keys() && !hadamard::supported(self.group_len()) {
            return Err(Error::value(
                "group_heads",
                format!(
                    "group_heads * head_dim a supported Hadamard size (2^k or 12/20/28 * 2^k) for head_dim = {}",
                    self.head_dim
                ),
                self.group_heads.to_string(),
            ));
        }
        if self.rotate_values && !hadamard::supported(self.head_dim) {
            return Err(Error::value(
                "rotate_values",
                "head_dim a supported Hadamard size",
                format!("head_dim = {}", self.head_dim),
            ));
        }
        let n = self.group_len();
        let total = self.num_kv_heads * self.head_dim;
        if self.key_perm.len() != self.num_layers {
            return Err(Error::shape(
                "key_perm",
                format!("{} layers", self.num_layers),
                format!("{} layers", self.key_perm.len()),
            ));
        }
        for (l, p) in self.key_perm.iter().enumerate() {
            if p.len() != total {
                return Err(Error::shape(
                    &format!("key_perm[{l}]"),
                    format!("[{total}] (num_kv_heads * head_dim)"),
                    format!("[{}]", p.len()),
                ));
            }
            for (g, chunk) in p.chunks(n).enumerate() {
                let mut seen = vec![false; n];
                for &v in chunk {
                    if v as usize >= n || std::mem::replace(&mut seen[v as usize], true) {
                        return Err(Error::value(
                            &format!("key_perm[{l}] group {g}"),
                            format!("a permutation of 0..{n}"),
                            format!("repeated or out-of-range entry {v}"),
                        ));
                    }
                }
            }
        }
        for (name, clips) in [
            ("key_clip", &self.key_clip),
            ("value_clip", &self.value_clip),
        ] {
            if clips.len() != self.num_layers {
                return Err(Error::shape(
                    name,
                    format!("[{}]", self.num_layers),
                    format!("[{}]", clips.len()),
                ));
            }
            if let Some(c) = clips.iter().find(|c| !(**c > 0.0 && **c <= 1.0)) {
                return Err(Error::value(name, "ratios in (0, 1]", c.to_string()));
            }
        }
        Ok(())
    }

    /// Writes the plan as safetensors (`key_perm` i32 `[L, Hkv*D]`, `key_clip` and
    /// `value_clip` f32 `[L]`, settings in the metadata), atomically (temporary file, then
    /// rename). `extra` metadata entries are stored beside ours.
    pub fn save(&self, path: &Path, extra: &HashMap<String, String>) -> Result<()> {
        let ps = path.display().to_string();
        crate::io::write_atomic(path, &self.to_bytes(extra, &ps)?)
    }

    /// The bytes [`RotationPlan::save`] writes; `name` labels errors.
    pub fn to_bytes(&self, extra: &HashMap<String, String>, name: &str) -> Result<Vec<u8>> {
        let ps = name;
        let perm: Vec<u8> = self
            .key_perm
            .iter()
            .flatten()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect();
        let kc: Vec<u8> = self.key_clip.iter().flat_map(|v| v.to_le_bytes()).collect();
        let vc: Vec<u8> = self
            .value_clip
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let total = self.num_kv_heads * self.head_dim;
        let views = [
            (
                "key_perm",
                safetensors::Dtype::I32,
                vec![self.num_layers, total],
                &perm,
            ),
            (
                "key_clip",
                safetensors::Dtype::F32,
                vec![self.num_layers],
                &kc,
            ),
            (
                "value_clip",
                safetensors::Dtype::F32,
                vec![self.num_layers],
                &vc,
            ),
        ];
        let mut tensors = Vec::new();
        for (name, dt, shape, data) in views {
            let v = safetensors::tensor::TensorView::new(dt, shape, data)
                .map_err(|e| Error::format(ps, e.to_string()))?;
            tensors.push((name.to_string(), v));
        }
        let mut meta: HashMap<String, String> = extra.clone();
        meta.insert("format".into(), "rotatekv.plan".into());
        meta.insert("format_version".into(), PLAN_VERSION.into());
        meta.insert("mode".into(), self.mode.as_str().into());
        meta.insert("num_layers".into(), self.num_layers.to_string());
        meta.insert("num_kv_heads".into(), self.num_kv_heads.to_string());
        meta.insert("head_dim".into(), self.head_dim.to_string());
        meta.insert("group_heads".into(), self.group_heads.to_string());
        meta.insert("rotate_values".into(), self.rotate_values.to_string());
        meta.remove(CHECKSUM_KEY);
        meta.insert(CHECKSUM_KEY.into(), plan_checksum(&meta, [&perm, &kc, &vc]));
        safetensors::tensor::serialize(tensors, Some(meta))
            .map_err(|e| Error::format(ps, e.to_string()))
    }

    /// Reads a plan written by [`RotationPlan::save`]; returns it with the file's metadata.
    /// Any inconsistency raises a `Format` error naming the file.
    pub fn load(path: &Path) -> Result<(Self, HashMap<String, String>)> {
        let ps = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::io(&ps, &e))?;
        Self::from_bytes(&bytes, &ps)
    }

    /// Parses the bytes of a saved plan; `name` (the file) labels errors.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<(Self, HashMap<String, String>)> {
        let ps = name;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::format(ps, format!("not a safetensors file: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::format(ps, format!("not a safetensors file: {e}")))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| -> Result<&String> {
            meta.get(k)
                .ok_or_else(|| Error::format(ps, format!("metadata lacks '{k}'")))
        };
        if get("format")? != "rotatekv.plan" {
            return Err(Error::format(ps, "not a rotatekv plan (metadata 'format')"));
        }
        // Version 1 files predate the checksum; they are still read.
        let version = get("format_version")?.as_str();
        if version != PLAN_VERSION && version != "1" {
            return Err(Error::format(
                ps,
                format!("unsupported plan format_version {version:?} (this build reads 1 and {PLAN_VERSION})"),
            ));
        }
        let num = |k: &str| -> Result<usize> {
            get(k)?
                .parse::<usize>()
                .map_err(|_| Error::format(ps, format!("metadata '{k}' is not an integer")))
        };
        let num_layers = num("num_layers")?;
        let num_kv_heads = num("num_kv_heads")?;
        let head_dim = num("head_dim")?;
        let group_heads = num("group_heads")?;
        let mode = Mode::parse(get("mode")?).map_err(|e| Error::format(ps, e.to_string()))?;
        let rotate_values = match get("rotate_values")?.as_str() {
            "true" => true,
            "false" => false,
            other => return Err(Error::format(ps, format!("rotate_values = {other:?}"))),
        };
        if num_layers
            .saturating_mul(num_kv_heads)
            .saturating_mul(head_dim)
            > 1 << 28
        {
            return Err(Error::format(ps, "implausibly large plan dimensions"));
        }
        let tensor = |name: &str, dt: safetensors::Dtype, shape: &[usize]| -> Result<Vec<u8>> {
            let t = st
                .tensor(name)
                .map_err(|_| Error::format(ps, format!("missing tensor '{name}'")))?;
            if t.dtype() != dt || t.shape() != shape {
                return Err(Error::format(
                    ps,
                    format!(
                        "tensor '{name}': expected {dt:?} {shape:?}, got {:?} {:?}",
                        t.dtype(),
                        t.shape()
                    ),
                ));
            }
            Ok(t.data().to_vec())
        };
        let total = num_kv_heads * head_dim;
        let perm = tensor("key_perm", safetensors::Dtype::I32, &[num_layers, total])?;
        let kc = tensor("key_clip", safetensors::Dtype::F32, &[num_layers])?;
        let vc = tensor("value_clip", safetensors::Dtype::F32, &[num_layers])?;
        if version == PLAN_VERSION
            && meta.get(CHECKSUM_KEY) != Some(&plan_checksum(&meta, [&perm, &kc, &vc]))
        {
            return Err(Error::format(ps, "checksum mismatch (file damaged)"));
        }
        let mut key_perm = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let row = &perm[l * total * 4..(l + 1) * total * 4];
            let mut v = Vec::with_capacity(total);
            for c in row.chunks_exact(4) {
                let x = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if x < 0 {
                    return Err(Error::format(ps, format!("key_perm[{l}] has {x}")));
                }
                v.push(x as u32);
            }
            key_perm.push(v);
        }
        let f32s = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let plan = RotationPlan {
            num_layers,
            num_kv_heads,
            head_dim,
            group_heads,
            mode,
            rotate_values,
            key_perm,
            key_clip: f32s(kc),
            value_clip: f32s(vc),
        };
        plan.validate()
            .map_err(|e| Error::format(ps, format!("invalid plan: {e}")))?;
        Ok((plan, meta))
    }
}

const PLAN_VERSION: &str = "2";
const CHECKSUM_KEY: &str = "checksum";

/// FNV-1a 64 (hex) over every metadata entry but the checksum itself, in key order, then the
/// three tensors: a flipped byte anywhere in a plan file (extra metadata included) is caught.
fn plan_checksum(meta: &HashMap<String, String>, tensors: [&[u8]; 3]) -> String {
    let mut keys: Vec<&String> = meta.keys().filter(|k| *k != CHECKSUM_KEY).collect();
    keys.sort();
    let mut buf = Vec::new();
    for k in keys {
        buf.extend_from_slice(k.as_bytes());
        buf.push(0);
        buf.extend_from_slice(meta[k].as_bytes());
        buf.push(0);
    }
    for t in tensors {
        buf.extend_from_slice(t);
    }
    format!("{:016x}", crate::io::fnv1a64(&buf))
}

/// Identity permutations of `total / group_len` head groups, concatenated.
pub fn identity_perm(total: usize, group_len: usize) -> Vec<u32> {
    (0..total).map(|i| (i % group_len) as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_groups() {
        let p = RotationPlan::hadamard(2, 3, 64, Mode::PreRope, None, true).unwrap();
        assert_eq!(p.group_heads, 3); // 192 = 12 * 16
        let p = RotationPlan::hadamard(2, 8, 128, Mode::PreRope, None, true).unwrap();
        assert_eq!(p.group_heads, 8);
        let p = RotationPlan::hadamard(2, 5, 128, Mode::PreRope, None, true).unwrap();
        assert_eq!(p.group_heads, 5); // 640 = 20 * 32
        let p = RotationPlan::hadamard(2, 7, 64, Mode::PreRope, None, true).unwrap();
        assert_eq!(p.group_heads, 7); // 448 = 28 * 16
        let p = RotationPlan::hadamard(2, 8, 128, Mode::PostRope, None, true).unwrap();
        assert_eq!(p.group_heads, 1);
        assert!(RotationPlan::hadamard(2, 8, 128, Mode::PreRope, Some(3), true).is_err());
        assert!(RotationPlan::hadamard(2, 9, 64, Mode::PreRope, Some(9), true).is_err());
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = RotationPlan::identity(2, 2, 64).unwrap();
        p.key_perm[1][5] = 4;
        let e = p.validate().unwrap_err().to_string();
        assert!(e.contains("key_perm[1]"), "{e}");
        let mut p = RotationPlan::identity(2, 2, 64).unwrap();
        p.key_clip[0] = 1.5;
        assert!(p.validate().unwrap_err().to_string().contains("key_clip"));
        assert!(RotationPlan::identity(2, 2, 60).is_err());
    }

    #[test]
    fn save_load_roundtrip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("rkv-plan-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plan.safetensors");
        let mut p = RotationPlan::hadamard(3, 4, 64, Mode::PreRope, Some(2), true).unwrap();
        p.key_perm[1].swap(0, 7);
        p.key_clip[2] = 0.8;
        let mut extra = HashMap::new();
        extra.insert("model".to_string(), "tiny".to_string());
        p.save(&path, &extra).unwrap();
        let (q, meta) = RotationPlan::load(&path).unwrap();
        assert_eq!(p, q);
        assert_eq!(meta["model"], "tiny");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 5);
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            RotationPlan::load(&path),
            Err(Error::Format { .. })
        ));
        std::fs::write(&path, b"garbage").unwrap();
        assert!(matches!(
            RotationPlan::load(&path),
            Err(Error::Format { .. })
        ));
        assert!(matches!(
            RotationPlan::load(&dir.join("missing")),
            Err(Error::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
