// Grouped Walsh-Hadamard transform of rows: y[r] = H x[r] (or Hᵀ), the same transform as
// rust/src/hadamard.rs, bit for bit in f32.
//
// Grid: any number of blocks, each taking rows blockIdx.x, blockIdx.x + gridDim.x, ...
// Dynamic shared memory: n floats when the row fits (`scratch == 0`); otherwise the row is
// transformed in `scratch`, an f32 buffer of gridDim.x * n floats in global memory.
#include "rotatekv.cuh"

RKV_GLOBAL void rkv_fwht(RkvFwhtParams p, u64 scratch) {
  RKV_DYN_SMEM(float, sm);
  i32 n = p.n;
  float* buf = scratch ? reinterpret_cast<float*>(scratch) + (i64)blockIdx.x * n : sm;
  for (i64 r = blockIdx.x; r < p.rows; r += gridDim.x) {
    for (i32 i = threadIdx.x; i < n; i += RKV_THREADS) buf[i] = rkv_load(p.x, r * n + i, p.dtype);
    __syncthreads();
    rkv_fwht_block(buf, 1, n, n, p.inverse != 0, true);
    for (i32 i = threadIdx.x; i < n; i += RKV_THREADS) rkv_store(p.y, r * n + i, p.dtype, buf[i]);
    __syncthreads();
  }
}
