//! Launches of the standalone kernels (the store's own launches live with the store and the
//! attention code).

use std::sync::Arc;

use super::abi::{RkvFwhtParams, RkvMassParams, MASS_TILE, SMEM_DEFAULT, THREADS};
use super::backend::{Backend, Launch};
use crate::error::{Error, Result};
use crate::saliency::{check_dims, MassDims};
use crate::store::{dtype_code, DevTensor};

/// `y[r] = H x[r]` (or `Hᵀ`) for `rows` contiguous rows of `n` elements.
pub fn fwht(
    b: &Arc<dyn Backend>,
    x: &DevTensor,
    y: &DevTensor,
    rows: usize,
    n: usize,
    inverse: bool,
) -> Result<()> {
    let contiguous = |t: &DevTensor| {
        t.strides[3] == 1
            && t.strides[2] == t.shape[3]
            && t.strides[1] == t.shape[2] * t.shape[3]
            && t.strides[0] == t.shape[1] * t.shape[2] * t.shape[3]
    };
    if x.shape != y.shape || x.dtype != y.dtype || !contiguous(x) || !contiguous(y) {
        return Err(Error::shape(
            "x",
            "contiguous x and out of one shape and dtype",
            format!("{:?} / {:?}", x.shape, y.shape),
        ));
    }
    if rows == 0 {
        return Ok(());
    }
    // One block per row up to a few per SM; rows that do not fit in shared memory are
    // transformed in a global scratch row per block.
    let big = n * 4 > SMEM_DEFAULT;
    // Large rows need a scratch row per block: keep the scratch within 256 MiB.
    let most = if big {
        (256 << 20) / (n * 4)
    } else {
        usize::MAX
    };
    let grid = rows.min(8 * b.sm_count().max(1)).min(most).max(1);
    let scratch = if big { b.temp(grid * n * 4)? } else { 0 };
    let p = RkvFwhtParams {
        x: x.ptr,
        y: y.ptr,
        rows: rows as i64,
        n: n as i32,
        dtype: dtype_code(x.dtype),
        inverse: inverse as i32,
        pad: 0,
    };
    let smem = if big { 0 } else { n * 4 };
    let res = b.launch(Launch::Fwht(&p, scratch, [grid as u32, 1, 1], smem));
    if big {
        b.free_temp(scratch);
    }
    res
}

/// Device addresses of [`attention_mass`]'s arrays (layouts as in `RkvMassParams`; `k_valid`
/// and `prior` may be 0).
#[derive(Clone, Copy, Debug)]
#[allow(missing_docs)]
pub struct MassBuffers {
    pub q: u64,
    pub k: u64,
    pub q_pos: u64,
    pub k_pos: u64,
    pub k_valid: u64,
    pub prior: u64,
    pub lse: u64,
    pub mass: u64,
    pub count: u64,
}

/// Attention mass of a chunk's keys on a device (`crate::saliency` has the CPU version):
/// `rkv_mass_lse` then `rkv_mass_keys` on the current stream.
pub fn attention_mass(
    b: &Arc<dyn Backend>,
    buf: &MassBuffers,
    dims: MassDims,
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
    lag: usize,
) -> Result<()> {
    check_dims(dims, scale, softcap, window)?;
    let narrow = |name: &str, v: usize| {
        i32::try_from(v).map_err(|_| Error::value(name, "at most 2^31 - 1", v.to_string()))
    };
    if dims.b > 65535 || dims.hq > 65535 {
        return Err(Error::shape(
            "q",
            "at most 65535 sequences and query heads (grid limits)",
            format!("{dims:?}"),
        ));
    }
    let p = RkvMassParams {
        q: buf.q,
        k: buf.k,
        q_pos: buf.q_pos,
        k_pos: buf.k_pos,
        k_valid: buf.k_valid,
        prior: buf.prior,
        lse: buf.lse,
        mass: buf.mass,
        count: buf.count,
        batch: narrow("q", dims.b)?,
        hq: narrow("q", dims.hq)?,
        tq: narrow("q", dims.tq)?,
        hkv: narrow("k", dims.hkv)?,
        tk: narrow("k", dims.tk)?,
        d: narrow("q", dims.d)?,
        window: narrow("window", window.unwrap_or(0))?,
        lag: narrow("lag", lag)?,
        scale,
        softcap: softcap.unwrap_or(0.0),
    };
    let threads = THREADS as usize;
    let smem_lse = (dims.d + 2 * threads) * 4;
    let smem_keys = MASS_TILE * (dims.d + 3) * 4;
    if smem_lse.max(smem_keys) > SMEM_DEFAULT {
        return Err(Error::shape(
            "q",
            "a head size whose query tile fits 48 KiB of shared memory",
            dims.d.to_string(),
        ));
    }
    if dims.b == 0 || dims.tk == 0 {
        return Ok(());
    }
    if dims.tq > 0 && dims.hq > 0 {
        let grid = [dims.tq as u32, dims.hq as u32, dims.b as u32];
        b.launch(Launch::Mass(&p, false, grid, smem_lse))?;
    }
    let grid = [dims.tk.div_ceil(threads) as u32, dims.b as u32, 1];
    b.launch(Launch::Mass(&p, true, grid, smem_keys))
}
