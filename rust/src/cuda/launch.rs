//! Launches of the standalone kernels (the store's own launches live with the store and the
//! attention code).

use std::sync::Arc;

use super::abi::{RkvFwhtParams, SMEM_DEFAULT};
use super::backend::{Backend, Launch};
use crate::error::{Error, Result};
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
