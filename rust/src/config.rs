//! Settings and the static description kernels read ([`Meta`]): shapes, quantization
//! settings, the rotation plan, RoPE, the transforms and each class's block layout. The
//! store, the caller-owned pools ([`crate::paged`]) and the CUDA ABI all take a `Meta`.

use crate::error::{Error, Result};
use crate::format::{check_bits, class_index, FpFormat, Layout, CLASS_BITS};
use crate::hadamard::Hadamard;
use crate::rope::Rope;
use crate::rotation::{Mode, RotationPlan};

/// How keys are grouped for quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyLayout {
    /// Groups of `group_size` channels of one token.
    PerToken,
    /// One group per channel over a page of tokens (KIVI).
    PerChannel,
}

impl KeyLayout {
    /// Parses `"per_token" | "per_channel"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "per_token" => Ok(KeyLayout::PerToken),
            "per_channel" => Ok(KeyLayout::PerChannel),
            _ => Err(Error::value(
                "key_layout",
                "'per_token' or 'per_channel'",
                format!("{s:?}"),
            )),
        }
    }
    /// The name used in Python and files.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyLayout::PerToken => "per_token",
            KeyLayout::PerChannel => "per_channel",
        }
    }
}

/// Quantization settings of a store.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    /// Default bits of a token (2, 3, 4, 8 or 16): the key width of its class.
    pub bits: u8,
    /// Value width of tokens in the default class (`k4v2`: `bits` 4, `value_bits` 2; keys
    /// usually need more); `None`: `bits`. Other classes keep one width for both.
    pub value_bits: Option<u8>,
    /// Channels per group; `None`: the head dim.
    pub group_size: Option<usize>,
    /// Key clip ratio; `None`: the plan's per-layer value.
    pub key_clip: Option<f32>,
    /// Value clip ratio; `None`: the plan's per-layer value.
    pub value_clip: Option<f32>,
    /// Most recent tokens per sequence kept in 16 bits.
    pub residual: usize,
    /// Key grouping.
    pub key_layout: KeyLayout,
    /// Tokens per page (32 or 64); `None`: 64 per token, 32 per channel.
    pub page_tokens: Option<usize>,
    /// Format of 16-bit tokens.
    pub fp_format: FpFormat,
}

impl QuantConfig {
    /// The value width of class `bits`: `value_bits` for the default class, else `bits`.
    pub fn value_width(&self, bits: u8) -> u8 {
        match self.value_bits {
            Some(vb) if bits == self.bits => vb,
            _ => bits,
        }
    }
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            bits: 2,
            value_bits: None,
            group_size: None,
            key_clip: None,
            value_clip: None,
            residual: 0,
            key_layout: KeyLayout::PerToken,
            page_tokens: None,
            fp_format: FpFormat::F16,
        }
    }
}

/// Everything kernels and the store know besides the tokens: shapes, settings, the plan,
/// RoPE, the transforms and the block layout of every class.
#[derive(Clone, Debug)]
pub struct Meta {
    /// Layers.
    pub num_layers: usize,
    /// Sequences.
    pub batch: usize,
    /// KV heads.
    pub heads: usize,
    /// Head dim.
    pub d: usize,
    /// Settings.
    pub cfg: QuantConfig,
    /// Resolved group size.
    pub group: usize,
    /// Resolved page capacity.
    pub cap: usize,
    /// Rotation plan.
    pub plan: RotationPlan,
    /// RoPE (required in pre-RoPE mode).
    pub rope: Option<Rope>,
    /// Key transform (size `group_heads * d`), when the plan rotates keys.
    pub had_k: Option<Hadamard>,
    /// Value transform (size `d`), when values are rotated.
    pub had_v: Option<Hadamard>,
    /// Page layouts by class index.
    pub layouts: Vec<Layout>,
    /// Most tokens one sequence may hold in one layer; `None`: unbounded.
    pub max_tokens: Option<usize>,
}

impl Meta {
    /// Layout of a class.
    pub fn layout(&self, bits: u8) -> &Layout {
        &self.layouts[class_index(bits)]
    }
    /// Whether tokens pass through the 16-bit recent window.
    pub fn uses_window(&self) -> bool {
        self.cfg.bits < 16
            && (self.cfg.residual > 0 || self.cfg.key_layout == KeyLayout::PerChannel)
    }
    /// Key and value clip ratios of a layer.
    pub fn clips(&self, layer: usize) -> (f32, f32) {
        (
            self.cfg.key_clip.unwrap_or(self.plan.key_clip[layer]),
            self.cfg.value_clip.unwrap_or(self.plan.value_clip[layer]),
        )
    }
}

/// Checks the KV heads and head dim of a store or a block format.
pub fn check_dims(heads: usize, d: usize) -> Result<()> {
    if heads == 0 || heads > 4096 {
        return Err(Error::value(
            "num_kv_heads",
            "1 ..= 4096",
            heads.to_string(),
        ));
    }
    if d == 0 || !d.is_multiple_of(8) || d > 4096 {
        return Err(Error::value(
            "head_dim",
            "a multiple of 8 up to 4096",
            d.to_string(),
        ));
    }
    Ok(())
}

/// Checks the shape of a store (layers, sequences, KV heads, head dim) before anything of
/// that size is built (the binding calls it before making a default plan).
pub fn check_store_shape(num_layers: usize, batch: usize, heads: usize, d: usize) -> Result<()> {
    check_dims(heads, d)?;
    if batch == 0 || batch > 1 << 20 {
        return Err(Error::value("batch_size", "1 ..= 2^20", batch.to_string()));
    }
    if num_layers == 0 || num_layers > 1 << 16 {
        return Err(Error::value(
            "num_layers",
            "1 ..= 65536",
            num_layers.to_string(),
        ));
    }
    if num_layers.saturating_mul(batch) > 1 << 22 {
        return Err(Error::value(
            "batch_size",
            "num_layers * batch_size <= 2^22",
            format!("{num_layers} * {batch}"),
        ));
    }
    Ok(())
}

impl Meta {
    /// The description of a store: every check of shapes, settings, plan and RoPE is here,
    /// once, for the store and (through [`Meta::for_blocks`]) the pools.
    pub fn new(
        num_layers: usize,
        batch: usize,
        heads: usize,
        d: usize,
        cfg: QuantConfig,
        plan: RotationPlan,
        rope: Option<Rope>,
    ) -> Result<Meta> {
        check_store_shape(num_layers, batch, heads, d)?;
        Self::build(num_layers, batch, heads, d, cfg, plan, rope, true)
    }

    /// The description of bare blocks of `cfg.page_tokens` tokens, per-token keys, for a
    /// pool of `batch` requests (the CUDA grid's batch).
    pub fn for_blocks(
        heads: usize,
        d: usize,
        cfg: QuantConfig,
        plan: RotationPlan,
        rope: Option<Rope>,
    ) -> Result<Meta> {
        if cfg.key_layout != KeyLayout::PerToken || cfg.residual != 0 {
            return Err(Error::value(
                "config",
                "per-token keys and no recent window in a block format",
                format!(
                    "{} keys, residual {}",
                    cfg.key_layout.as_str(),
                    cfg.residual
                ),
            ));
        }
        let layers = plan.num_layers;
        Self::build(layers, 1, heads, d, cfg, plan, rope, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        num_layers: usize,
        batch: usize,
        heads: usize,
        d: usize,
        cfg: QuantConfig,
        plan: RotationPlan,
        rope: Option<Rope>,
        header: bool,
    ) -> Result<Meta> {
        check_dims(heads, d)?;
        check_bits("bits", cfg.bits)?;
        if let Some(vb) = cfg.value_bits {
            check_bits("value_bits", vb)?;
            if (vb == 16) != (cfg.bits == 16) {
                return Err(Error::value(
                    "value_bits",
                    format!(
                        "16 with 16-bit keys, a quantized width with {}-bit keys",
                        cfg.bits
                    ),
                    vb.to_string(),
                ));
            }
        }
        if (plan.num_layers, plan.num_kv_heads, plan.head_dim) != (num_layers, heads, d) {
            return Err(Error::value(
                "plan",
                format!("a plan for {num_layers} layers x {heads} KV heads x {d} channels"),
                format!(
                    "{} layers x {} KV heads x {} channels",
                    plan.num_layers, plan.num_kv_heads, plan.head_dim
                ),
            ));
        }
        plan.validate()?;
        let group = cfg.group_size.unwrap_or(d);
        if group == 0 || !group.is_multiple_of(8) || !d.is_multiple_of(group) {
            return Err(Error::value(
                "group_size",
                format!("a multiple of 8 that divides head_dim = {d}"),
                group.to_string(),
            ));
        }
        for (name, c) in [("key_clip", cfg.key_clip), ("value_clip", cfg.value_clip)] {
            if let Some(c) = c {
                if !(c > 0.0 && c <= 1.0) {
                    return Err(Error::value(name, "a ratio in (0, 1]", c.to_string()));
                }
            }
        }
        let cap = cfg.page_tokens.unwrap_or(match cfg.key_layout {
            KeyLayout::PerToken => 64,
            KeyLayout::PerChannel => 32,
        });
        if cap != 32 && cap != 64 {
            return Err(Error::value("page_tokens", "32 or 64", cap.to_string()));
        }
        if cfg.residual > 1 << 20 {
            return Err(Error::value(
                "residual",
                "at most 2^20",
                cfg.residual.to_string(),
            ));
        }
        match (&rope, plan.mode) {
            (None, Mode::PreRope) => {
                return Err(Error::value(
                    "rope_inv_freq",
                    "the model's RoPE inverse frequencies (the plan's mode is 'pre_rope')",
                    "None",
                ))
            }
            (Some(r), _) if 2 * r.half() > d => {
                return Err(Error::shape(
                    "rope_inv_freq",
                    format!("at most head_dim/2 = {} entries", d / 2),
                    r.half().to_string(),
                ))
            }
            _ => {}
        }
        let had_k = if plan.rotates_keys() {
            Some(Hadamard::new(plan.group_len())?)
        } else {
            None
        };
        let had_v = if plan.rotate_values {
            Some(Hadamard::new(d)?)
        } else {
            None
        };
        let per_channel = cfg.key_layout == KeyLayout::PerChannel;
        let layouts = CLASS_BITS
            .iter()
            .map(|&b| {
                let vb = cfg.value_width(b);
                if header {
                    Layout::new(b, vb, per_channel, cap, heads, d, group)
                } else {
                    Layout::block(b, vb, cap, heads, d, group)
                }
            })
            .collect();
        Ok(Meta {
            num_layers,
            batch,
            heads,
            d,
            cfg,
            group,
            cap,
            plan,
            rope,
            had_k,
            had_v,
            layouts,
            max_tokens: None,
        })
    }

    /// Keys `[n][Hkv*D]` to the stored basis (Hadamard per head group, then the layer's
    /// permutation), channel-major `[Hkv*D][n]`.
    pub fn keys_to_stored(&self, layer: usize, k: &[f32], n: usize) -> Vec<f32> {
        let hd = self.heads * self.d;
        let gl = self.plan.group_len();
        let perm = &self.plan.key_perm[layer];
        let mut out = vec![0f32; hd * n];
        let mut blk = vec![0f32; gl * n];
        for g in 0..self.heads / self.plan.group_heads {
            for c in 0..gl {
                for t in 0..n {
                    blk[c * n + t] = k[t * hd + g * gl + c];
                }
            }
            if let Some(h) = &self.had_k {
                h.forward_cols(&mut blk, n);
            }
            for j in 0..gl {
                let src = perm[g * gl + j] as usize;
                out[(g * gl + j) * n..(g * gl + j + 1) * n]
                    .copy_from_slice(&blk[src * n..(src + 1) * n]);
            }
        }
        out
    }

    /// Keys `[n][Hkv*D]` channel-major, unrotated (16-bit blocks).
    pub fn keys_raw_cm(&self, k: &[f32], n: usize) -> Vec<f32> {
        let hd = self.heads * self.d;
        let mut out = vec![0f32; hd * n];
        for t in 0..n {
            for c in 0..hd {
                out[c * n + t] = k[t * hd + c];
            }
        }
        out
    }
}
