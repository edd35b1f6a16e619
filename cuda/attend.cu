// Fused attention over packed pages: keys and values are dequantized in shared memory a tile
// of tokens at a time (never the whole cache), brought back to the model's basis (inverse
// permutation, inverse Hadamard over the head group, RoPE at each key's position for
// pre-RoPE plans), scored against the block's query rows, and accumulated with an online
// softmax in f32. Values stored rotated are summed in the rotated basis (16-bit tokens are
// rotated forward into it), and rkv_combine applies the inverse once per output row.
//
// Work split (flash-decoding): grid (splits, G * row_blocks, B). A block takes one sequence,
// one head group, up to `rows_per_block` query rows (query heads x query tokens of the group)
// and a contiguous range of the sequence's pages; rkv_combine merges the splits exactly.
// The same kernel serves decode (Tq = 1) and chunked causal prefill (Tq > 1).
#include "rotatekv.cuh"

// Dequantized element of a page: key (channel c, slot u) or value (slot u, channel c) of the
// head block `hb`.
RKV_DEV float rkv_key_at(const u8* hb, const RkvLayout& L, i32 c, i32 u, i32 fmt) {
  if (L.bits == 16) return rkv_fp16_load(reinterpret_cast<const u16*>(hb)[c * L.cap + u], fmt);
  float code = (float)rkv_get_code(hb + c * L.k_row, L.bits, L.cap, u);
  i32 si = L.per_channel ? c : (c / L.group) * L.cap + u;
  float s = rkv_f16_to_f32(reinterpret_cast<const u16*>(hb + L.k_scale)[si]);
  float z = rkv_f16_to_f32(reinterpret_cast<const u16*>(hb + L.k_zero)[si]);
  return code * s + z;
}

RKV_DEV float rkv_value_at(const u8* hb, const RkvLayout& L, i32 u, i32 c, i32 fmt) {
  if (L.bits == 16)
    return rkv_fp16_load(reinterpret_cast<const u16*>(hb + L.v_codes)[u * L.d + c], fmt);
  float code = (float)rkv_get_code(hb + L.v_codes + (i64)u * L.v_row, L.vbits, L.d, c);
  i32 si = u * (L.d / L.group) + c / L.group;
  float s = rkv_f16_to_f32(reinterpret_cast<const u16*>(hb + L.v_scale)[si]);
  float z = rkv_f16_to_f32(reinterpret_cast<const u16*>(hb + L.v_zero)[si]);
  return code * s + z;
}

// Shared memory, in floats: Q [R][D], ACC [R][D], QR [R][D], S [R][TT], M, L, CORR [R],
// tile [TT][n] (rust/src/cuda/abi.rs attend_tiles sizes it).
//
// Per-head plans outside pre-RoPE (group_heads = 1) take the fast path: queries are rotated
// once into the stored basis (QR = P H q, so QR . stored = q . k) and quantized tiles are
// scored as stored, with no inverse transform per tile. 16-bit pages (unrotated) use Q.
//
// What a fast version for long contexts would change (not done; no GPU has measured this
// one yet): score and accumulate straight from the packed codes in registers (one warp per
// page, lanes over tokens, integer dot products with the rotated query), keep the partial
// softmax state in registers, read codes with 16-byte vector loads, and overlap the next
// page's loads with the current page's math (cp.async / TMA on Hopper).


RKV_GLOBAL void rkv_attend(RkvAttendParams p) {
  RKV_DYN_SMEM(float, sm);
  const i32 tid = threadIdx.x, split = blockIdx.x, b = blockIdx.z;
  const i32 D = p.d, gh = p.group_heads, n = gh * D, gqa = p.hq / p.heads;
  const i32 hg = gh * gqa;  // query heads of one group
  const i32 rows_g = hg * p.tq, R = p.rows_per_block, TT = p.tile_tokens;
  const i32 nrb = (rows_g + R - 1) / R;
  const i32 g = blockIdx.y / nrb, r0 = (blockIdx.y % nrb) * R;
  const i32 nr = rows_g - r0 < R ? rows_g - r0 : R;
  float* Q = sm;
  float* ACC = Q + R * D;
  float* QR = ACC + R * D;
  float* S = QR + R * D;
  float* M = S + R * TT;
  float* Lsum = M + R;
  float* CORR = Lsum + R;
  float* T = CORR + R;
  // Paged pools (rotatekv.paged): this request's queries, tokens and block-table row, read
  // here on the device. Tq is then the longest request's query count: rows past this
  // request's own are neither computed nor combined.
  const bool paged = p.block_table != 0;
  i32 nq = p.tq, q0 = 0, seq = 0;
  if (paged) {
    const i32* qsl = reinterpret_cast<const i32*>(p.query_start);
    q0 = qsl[b];
    nq = qsl[b + 1] - q0;
    seq = reinterpret_cast<const i32*>(p.seq_lens)[b];
    if (seq < 0) seq = 0;
    if (r0 / hg >= nq) return;  // the whole block is past this request's queries
  }
  const i32* qpos = paged ? nullptr : reinterpret_cast<const i32*>(p.qpos) + (i64)b * p.tq;
  auto qpos_of = [&](i32 t) { return paged ? seq - nq + t : qpos[t]; };
  const u32* perm = reinterpret_cast<const u32*>(p.perm) + (i64)g * n;
  const float* inv_freq = reinterpret_cast<const float*>(p.inv_freq);

  // Row r of the block: query token t, query head qh (kv head g*gh + hl/gqa).
  for (i32 w = tid; w < R * D; w += RKV_THREADS) {
    i32 r = w / D, c = w % D;
    float v = 0.0f;
    i32 f = r0 + r, t = f / hg, qh = g * hg + f % hg;
    if (r < nr && t < nq) {
      i64 off = b * p.q_s[0] + qh * p.q_s[1] + (i64)(q0 + t) * p.q_s[2] + c * p.q_s[3];
      v = rkv_load(p.q, off, p.q_dtype) * p.scale;
    }
    Q[w] = v;
    ACC[w] = 0.0f;
  }
  for (i32 r = tid; r < R; r += RKV_THREADS) M[r] = -RKV_INF, Lsum[r] = 0.0f;
  __syncthreads();
  const bool fast = gh == 1 && p.mode != RKV_PRE_ROPE;
  if (fast) {
    // QR = P H q (ACC, still unused, holds H q while the permutation gathers from it).
    for (i32 w = tid; w < R * D; w += RKV_THREADS) ACC[w] = Q[w];
    __syncthreads();
    if (p.rotate_keys) rkv_fwht_block(ACC, R, D, D, false, true);
    for (i32 w = tid; w < R * D; w += RKV_THREADS) QR[w] = ACC[(w / D) * D + perm[w % D]];
    __syncthreads();
    for (i32 w = tid; w < R * D; w += RKV_THREADS) ACC[w] = 0.0f;
    __syncthreads();
  }

  const RkvPage* pages = nullptr;
  i32 np;
  if (paged) {
    np = (i32)(((i64)seq + p.block_size - 1) / p.block_size);
    if (np > p.max_blocks) np = p.max_blocks;
  } else {
    const i32* page_off = reinterpret_cast<const i32*>(p.page_off);
    pages = reinterpret_cast<const RkvPage*>(p.pages) + page_off[b];
    np = page_off[b + 1] - page_off[b];
  }
  const i32 p0 = (i32)((i64)split * np / p.splits), p1 = (i32)((i64)(split + 1) * np / p.splits);

  for (i32 pi = p0; pi < p1; ++pi) {
    RkvPage pg;
    if (paged) {
      const i32 blk = reinterpret_cast<const i32*>(p.block_table)[(i64)b * p.max_blocks + pi];
      // An id outside the pool reads as no tokens (checking it on the host would sync).
      if (blk < 0 || blk >= p.num_blocks) continue;
      pg.data = p.pool + (u64)((i64)blk * p.block_bytes);
      pg.cls = 0;
      pg.start = 0;
      pg.len = seq - pi * p.block_size < p.block_size ? seq - pi * p.block_size : p.block_size;
    } else {
      pg = pages[pi];
    }
    const RkvLayout L = p.lay[pg.cls];
    const u8* page = reinterpret_cast<const u8*>(pg.data);
    // Key positions: a store page's header, or a block's place in its request.
    const i32* kpos = reinterpret_cast<const i32*>(page);
    const i32 first = pi * p.block_size;
    auto kpos_of = [&](i32 u) { return paged ? first + u : kpos[u]; };
    const bool quant = L.bits < 16;
    for (i32 u0 = pg.start; u0 < pg.len; u0 += TT) {
      const i32 nt = pg.len - u0 < TT ? pg.len - u0 : TT;
      // 1. Keys of the tile in the model's basis: T[k][hl * D + c].
      for (i32 w = tid; w < nt * n; w += RKV_THREADS) {
        i32 k = w / n, j = w % n;
        const u8* hb = page + L.head_off + (i64)(g * gh + j / D) * L.head_bytes;
        float v = rkv_key_at(hb, L, j % D, u0 + k, p.fp_format);
        // Stored channel j of a quantized page is channel perm[j] of the transformed vector.
        T[k * n + (quant && !fast ? (i32)perm[j] : j)] = v;
      }
      __syncthreads();
      if (quant && !fast && p.rotate_keys) rkv_fwht_block(T, nt, n, n, true, true);
      if (p.mode == RKV_PRE_ROPE) {
        const i32 rh = p.rot_half;
        for (i32 w = tid; w < nt * gh * rh; w += RKV_THREADS) {
          i32 k = w / (gh * rh), hl = (w / rh) % gh, i = w % rh;
          float ang = (float)kpos_of(u0 + k) * inv_freq[i];
          float sn, cs;
          sincosf(ang, &sn, &cs);
          cs *= p.rope_scaling;
          sn *= p.rope_scaling;
          float* x = T + k * n + hl * D;
          float a = x[i], bb = x[i + rh];
          x[i] = a * cs - bb * sn;
          x[i + rh] = bb * cs + a * sn;
        }
        __syncthreads();
      }
      // 2. Scores, soft-cap and masks.
      for (i32 w = tid; w < nr * nt; w += RKV_THREADS) {
        i32 r = w / nt, k = w % nt;
        i32 f = r0 + r, t = f / hg, hl = (f % hg) / gqa;
        const float* q = (fast && quant ? QR : Q) + r * D;
        const float* x = T + k * n + hl * D;
        float s = 0.0f;
        for (i32 c = 0; c < D; ++c) s += q[c] * x[c];
        if (p.softcap > 0.0f) s = p.softcap * tanhf(s / p.softcap);
        i32 kp = kpos_of(u0 + k), qp = qpos_of(t);
        bool vis = (!p.causal || kp <= qp) && (p.window <= 0 || (i64)qp - kp < p.window);
        S[r * TT + k] = vis ? s : -RKV_INF;
      }
      __syncthreads();
      // 3. Online softmax, one thread per row.
      for (i32 r = tid; r < nr; r += RKV_THREADS) {
        float mx = -RKV_INF;
        for (i32 k = 0; k < nt; ++k) mx = fmaxf(mx, S[r * TT + k]);
        if (mx == -RKV_INF) {
          for (i32 k = 0; k < nt; ++k) S[r * TT + k] = 0.0f;
          CORR[r] = 1.0f;
          continue;
        }
        float mnew = fmaxf(M[r], mx);
        float corr = expf(M[r] - mnew);  // 0 for the first visible tile (M = -inf)
        float sum = 0.0f;
        for (i32 k = 0; k < nt; ++k) {
          float e = expf(S[r * TT + k] - mnew);
          S[r * TT + k] = e;
          sum += e;
        }
        Lsum[r] = Lsum[r] * corr + sum;
        M[r] = mnew;
        CORR[r] = corr;
      }
      __syncthreads();
      // 4. Values of the tile (rotated basis where values are rotated), then P V.
      for (i32 w = tid; w < nt * n; w += RKV_THREADS) {
        i32 k = w / n, j = w % n;
        const u8* hb = page + L.head_off + (i64)(g * gh + j / D) * L.head_bytes;
        T[k * n + j] = rkv_value_at(hb, L, u0 + k, j % D, p.fp_format);
      }
      __syncthreads();
      if (!quant && p.rotate_values) rkv_fwht_block(T, nt * gh, D, D, false, true);
      for (i32 w = tid; w < nr * D; w += RKV_THREADS) {
        i32 r = w / D, c = w % D;
        i32 hl = ((r0 + r) % hg) / gqa;
        float acc = ACC[w] * CORR[r];
        for (i32 k = 0; k < nt; ++k) acc += S[r * TT + k] * T[k * n + hl * D + c];
        ACC[w] = acc;
      }
      __syncthreads();
    }
  }

  // Partial state of each row: [m, l, acc[D]] at work[b][split][qh * Tq + t].
  float* work = reinterpret_cast<float*>(p.work);
  for (i32 w = tid; w < nr * (D + 2); w += RKV_THREADS) {
    i32 r = w / (D + 2), c = w % (D + 2);
    i32 f = r0 + r, t = f / hg, qh = g * hg + f % hg;
    i64 row = ((i64)b * p.splits + split) * p.hq * p.tq + (i64)qh * p.tq + t;
    work[row * (D + 2) + c] = c == 0 ? M[r] : c == 1 ? Lsum[r] : ACC[r * D + c - 2];
  }
}

// Merges the splits of each row, undoes the value rotation, normalizes and writes the output.
// Grid (Hq * Tq, B), RKV_THREADS threads, D floats of dynamic shared memory.
RKV_GLOBAL void rkv_combine(RkvCombineParams p) {
  RKV_DYN_SMEM(float, acc);
  const i32 row = blockIdx.x, b = blockIdx.y, D = p.d, rows = p.hq * p.tq;
  const i32 qh = row / p.tq, t = row % p.tq;
  i32 q0 = 0;
  if (p.query_start) {
    const i32* qsl = reinterpret_cast<const i32*>(p.query_start);
    q0 = qsl[b];
    if (t >= qsl[b + 1] - q0) return;  // past this request's queries
  }
  const float* work = reinterpret_cast<const float*>(p.work);
  float mstar = -RKV_INF;
  for (i32 s = 0; s < p.splits; ++s)
    mstar = fmaxf(mstar, work[(((i64)b * p.splits + s) * rows + row) * (D + 2)]);
  float l = 0.0f;
  for (i32 s = 0; s < p.splits; ++s) {
    const float* w = work + (((i64)b * p.splits + s) * rows + row) * (D + 2);
    if (w[0] != -RKV_INF) l += w[1] * expf(w[0] - mstar);
  }
  for (i32 c = threadIdx.x; c < D; c += RKV_THREADS) {
    float a = 0.0f;
    for (i32 s = 0; s < p.splits; ++s) {
      const float* w = work + (((i64)b * p.splits + s) * rows + row) * (D + 2);
      if (w[0] != -RKV_INF) a += w[2 + c] * expf(w[0] - mstar);
    }
    acc[c] = a;
  }
  __syncthreads();
  if (p.rotate_values) rkv_fwht_block(acc, 1, D, D, true, true);
  if (p.lse && threadIdx.x == 0) {
    i64 li = p.query_start ? (i64)(q0 + t) * p.hq + qh : (i64)b * rows + row;
    reinterpret_cast<float*>(p.lse)[li] = l > 0.0f ? mstar + logf(l) : -RKV_INF;
  }
  for (i32 c = threadIdx.x; c < D; c += RKV_THREADS) {
    float v = l > 0.0f ? acc[c] / l : 0.0f;
    rkv_store(p.out, b * p.o_s[0] + qh * p.o_s[1] + (i64)(q0 + t) * p.o_s[2] + c * p.o_s[3],
              p.o_dtype, v);
  }
}
