// Attention mass of a chunk's keys (rust/src/saliency.rs is the CPU version and the
// reference): mass[b, j] = sum over query heads h and queries t at distance >= lag of
// exp(s(h, t, j) - lse[b, h, t]), without attention maps.
//
// rkv_mass_lse: grid (Tq, Hq, B), RKV_THREADS threads, (D + 2 * RKV_THREADS) floats of
//   dynamic shared memory. One block per query row: each thread folds a strided share of the
//   keys into its own running max and sum, thread 0 merges the 128 partials in order (so
//   the result does not depend on scheduling) and with the prior, and writes lse.
// rkv_mass_keys: grid (ceil(Tk / RKV_THREADS), B), RKV_THREADS threads,
//   (RKV_MASS_TILE * (D + 3)) floats of dynamic shared memory. One thread per key: query rows
//   are staged RKV_MASS_TILE at a time through shared memory and every thread scores its key
//   against them, summing probabilities in query order (deterministic, no atomics).
#include "rotatekv.cuh"

#define RKV_MASS_TILE 8

RKV_DEV bool rkv_mass_visible(const RkvMassParams& p, i64 qp, i64 kp) {
  return kp <= qp && (p.window <= 0 || qp - kp < (i64)p.window);
}

RKV_DEV float rkv_mass_score(const RkvMassParams& p, const float* q, const float* k) {
  float s = 0.0f;
  for (i32 c = 0; c < p.d; ++c) s = fmaf(q[c], k[c], s);
  s *= p.scale;
  if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
  return s;
}

RKV_GLOBAL void rkv_mass_lse(RkvMassParams p) {
  RKV_DYN_SMEM(float, sm);
  const i32 t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const i32 D = p.d, kh = h / (p.hq / p.hkv);
  float* qrow = sm;
  float* pm = sm + D;
  float* pl = pm + RKV_THREADS;
  const i64 row = ((i64)b * p.hq + h) * p.tq + t;
  const float* q = reinterpret_cast<const float*>(p.q) + row * D;
  for (i32 c = tid; c < D; c += RKV_THREADS) qrow[c] = q[c];
  __syncthreads();
  const i64 qp = reinterpret_cast<const i64*>(p.q_pos)[(i64)b * p.tq + t];
  const i64* kpos = reinterpret_cast<const i64*>(p.k_pos) + (i64)b * p.tk;
  const unsigned char* kval =
      p.k_valid ? reinterpret_cast<const unsigned char*>(p.k_valid) + (i64)b * p.tk : nullptr;
  const float* keys = reinterpret_cast<const float*>(p.k) + ((i64)b * p.hkv + kh) * p.tk * D;
  float m = -RKV_INF, l = 0.0f;
  for (i32 j = tid; j < p.tk; j += RKV_THREADS) {
    if ((kval && !kval[j]) || !rkv_mass_visible(p, qp, kpos[j])) continue;
    float s = rkv_mass_score(p, qrow, keys + (i64)j * D);
    if (s > m) {
      l = l * expf(m - s) + 1.0f;
      m = s;
    } else {
      l += expf(s - m);
    }
  }
  pm[tid] = m;
  pl[tid] = l;
  __syncthreads();
  if (tid == 0) {
    float mm = p.prior ? reinterpret_cast<const float*>(p.prior)[row] : -RKV_INF;
    for (i32 i = 0; i < RKV_THREADS; ++i) mm = fmaxf(mm, pm[i]);
    float out = -RKV_INF;
    if (mm > -RKV_INF) {
      float sum = p.prior ? expf(reinterpret_cast<const float*>(p.prior)[row] - mm) : 0.0f;
      for (i32 i = 0; i < RKV_THREADS; ++i)
        if (pm[i] > -RKV_INF) sum += pl[i] * expf(pm[i] - mm);
      out = mm + logf(sum);
    }
    reinterpret_cast<float*>(p.lse)[row] = out;
  }
}

RKV_GLOBAL void rkv_mass_keys(RkvMassParams p) {
  RKV_DYN_SMEM(float, sm);
  const i32 b = blockIdx.y, tid = threadIdx.x, D = p.d;
  const i32 j = blockIdx.x * RKV_THREADS + tid;
  const i32 group = p.hq / p.hkv;
  float* qt = sm;                          // [TILE][D]
  float* lt = sm + RKV_MASS_TILE * D;      // [TILE] lse
  i64* pt = reinterpret_cast<i64*>(lt + RKV_MASS_TILE);  // [TILE] positions (8-aligned)
  const bool live = j < p.tk;
  const unsigned char* kval =
      p.k_valid ? reinterpret_cast<const unsigned char*>(p.k_valid) + (i64)b * p.tk : nullptr;
  const bool ok = live && (!kval || kval[j]);
  const i64 kp = live ? reinterpret_cast<const i64*>(p.k_pos)[(i64)b * p.tk + j] : 0;
  float mass = 0.0f;
  i32 count = 0;
  for (i32 h = 0; h < p.hq; ++h) {
    const float* key =
        reinterpret_cast<const float*>(p.k) + (((i64)b * p.hkv + h / group) * p.tk + j) * D;
    for (i32 t0 = 0; t0 < p.tq; t0 += RKV_MASS_TILE) {
      const i32 nt = p.tq - t0 < RKV_MASS_TILE ? p.tq - t0 : RKV_MASS_TILE;
      const i64 row0 = ((i64)b * p.hq + h) * p.tq + t0;
      __syncthreads();
      for (i32 w = tid; w < nt * D; w += RKV_THREADS)
        qt[w] = reinterpret_cast<const float*>(p.q)[row0 * D + w];
      for (i32 w = tid; w < nt; w += RKV_THREADS) {
        lt[w] = reinterpret_cast<const float*>(p.lse)[row0 + w];
        pt[w] = reinterpret_cast<const i64*>(p.q_pos)[(i64)b * p.tq + t0 + w];
      }
      __syncthreads();
      if (!ok) continue;
      for (i32 u = 0; u < nt; ++u) {
        const i64 qp = pt[u];
        if (!rkv_mass_visible(p, qp, kp) || qp - kp < (i64)p.lag || !(lt[u] > -RKV_INF))
          continue;
        mass += expf(rkv_mass_score(p, qt + u * D, key) - lt[u]);
        if (h == 0) ++count;
      }
    }
  }
  if (live) {
    reinterpret_cast<float*>(p.mass)[(i64)b * p.tk + j] = mass;
    reinterpret_cast<i32*>(p.count)[(i64)b * p.tk + j] = count;
  }
}
