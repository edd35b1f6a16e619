// Quantize + pack on append: every token of a call goes, rotated and permuted as the plan
// says, into its page slot in one launch; codes, scales and zeros are bit-identical to
// rust/src/page.rs (write_fp, write_quant_per_token, write_quant_per_channel).
#include "rotatekv.cuh"

// Warp-wide min and max (exact, so the order of the reduction does not matter).
RKV_DEV void rkv_warp_minmax(float* mn, float* mx) {
  for (i32 o = 16; o > 0; o /= 2) {
    *mn = fminf(*mn, __shfl_xor_sync(0xffffffffu, *mn, o));
    *mx = fmaxf(*mx, __shfl_xor_sync(0xffffffffu, *mx, o));
  }
}

// One warp quantizes the group x[0..grp): scale and zero (f16 bits) into *s, *z; lane-strided
// codes are handed to `put(c, code)`.
template <class Put>
RKV_DEV void rkv_warp_group(const float* x, i32 grp, i32 lane, i32 bits, float clip, u16* s,
                            u16* z, Put put) {
  float mn = RKV_INF, mx = -RKV_INF;
  for (i32 c = lane; c < grp; c += 32) mn = fminf(mn, x[c]), mx = fmaxf(mx, x[c]);
  rkv_warp_minmax(&mn, &mx);
  rkv_group_params(mn, mx, bits, clip, s, z);
  float sf = rkv_f16_to_f32(*s), zf = rkv_f16_to_f32(*z);
  for (i32 c = lane; c < grp; c += 32) put(c, rkv_code_of(x[c], sf, zf, bits));
}

// Byte `j` of the packed row of `n` codes (rust/src/quant.rs pack_row).
RKV_DEV u8 rkv_pack_byte(const u8* codes, i32 bits, i32 n, i32 j) {
  switch (bits) {
    case 8:
      return codes[j];
    case 4:
      return (u8)((codes[j] & 15) | (codes[j + n / 2] << 4));
    case 2: {
      i32 q = n / 4;
      return (u8)((codes[j] & 3) | ((codes[j + q] & 3) << 2) | ((codes[j + 2 * q] & 3) << 4) |
                  ((codes[j + 3 * q] & 3) << 6));
    }
    default: {
      i32 q = n / 4, q8 = n / 8;
      if (j < q) {
        return (u8)((codes[j] & 3) | ((codes[j + q] & 3) << 2) | ((codes[j + 2 * q] & 3) << 4) |
                    ((codes[j + 3 * q] & 3) << 6));
      }
      i32 jj = j - q;
      u32 b = 0;
      for (i32 s = 0; s < 8; ++s) b |= (u32)((codes[jj + s * q8] >> 2) & 1) << s;
      return (u8)b;
    }
  }
}

// Packs group `g` of one token into slot `slot` of `page` (layout L): keys `kx` and values
// `vx` (n = gh * d floats each, model basis, in shared memory; `kst` and `codes` are n-float
// and n-byte scratch). Per-channel pages leave their keys to rkv_channel_keys: the
// stored-basis keys go to `key_out` instead. The whole block calls it, after a barrier.
RKV_DEV void rkv_pack_token(float* kx, float* vx, float* kst, u8* codes, u8* page,
                            const RkvLayout& L, i32 slot, i32 g, i32 gh, i32 d,
                            const u32* perm, const RkvPack& a, float* key_out) {
  const i32 tid = threadIdx.x, n = gh * d;
  if (L.bits == 16) {
    // Unrotated 16-bit copy: keys channel-major [D][cap], values [cap][D].
    for (i32 i = tid; i < n; i += RKV_THREADS) {
      i32 h = g * gh + i / d, c = i % d;
      u8* hb = page + L.head_off + (i64)h * L.head_bytes;
      reinterpret_cast<u16*>(hb)[c * L.cap + slot] = rkv_fp16_store(kx[i], a.fp_format);
      reinterpret_cast<u16*>(hb + L.v_codes)[slot * d + c] = rkv_fp16_store(vx[i], a.fp_format);
    }
    return;
  }

  // Keys to the stored basis: Hadamard over the group, then the permutation.
  if (a.rotate_keys) rkv_fwht_block(kx, 1, n, n, false, true);
  perm += (i64)g * n;
  for (i32 j = tid; j < n; j += RKV_THREADS) kst[j] = kx[perm[j]];
  if (a.rotate_values) rkv_fwht_block(vx, gh, d, d, false, true);
  __syncthreads();

  const i32 warp = tid / 32, lane = tid % 32, grp = L.group, ng = d / grp;
  if (L.per_channel) {
    // Per-channel pages are quantized whole by rkv_channel_keys, from these rows.
    float* out = key_out + (i64)g * n;
    for (i32 j = tid; j < n; j += RKV_THREADS) out[j] = kst[j];
  } else {
    // One warp per (head, key group of this token). Key rows are channel-major, so codes of
    // neighbouring slots share bytes: rkv_set_code writes with word atomics.
    for (i32 w = warp; w < gh * ng; w += RKV_THREADS / 32) {
      i32 hl = w / ng, gi = w % ng, h = g * gh + hl;
      u8* hb = page + L.head_off + (i64)h * L.head_bytes;
      u16 s, z;
      rkv_warp_group(kst + hl * d + gi * grp, grp, lane, L.bits, a.key_clip, &s, &z,
                     [&](i32 c, u32 code) {
                       rkv_set_code(hb + (gi * grp + c) * L.k_row, L.bits, L.cap, slot, code);
                     });
      if (lane == 0) {
        reinterpret_cast<u16*>(hb + L.k_scale)[gi * L.cap + slot] = s;
        reinterpret_cast<u16*>(hb + L.k_zero)[gi * L.cap + slot] = z;
      }
    }
  }

  // Values (L.vbits wide): per-token groups, codes gathered per head, then whole packed
  // bytes of this slot's own row written.
  for (i32 w = warp; w < gh * ng; w += RKV_THREADS / 32) {
    i32 hl = w / ng, gi = w % ng, h = g * gh + hl;
    u8* hb = page + L.head_off + (i64)h * L.head_bytes;
    u16 s, z;
    u8* out = codes + hl * d + gi * grp;
    rkv_warp_group(vx + hl * d + gi * grp, grp, lane, L.vbits, a.value_clip, &s, &z,
                   [&](i32 c, u32 code) { out[c] = (u8)code; });
    if (lane == 0) {
      reinterpret_cast<u16*>(hb + L.v_scale)[slot * ng + gi] = s;
      reinterpret_cast<u16*>(hb + L.v_zero)[slot * ng + gi] = z;
    }
  }
  __syncthreads();
  for (i32 w = tid; w < gh * L.v_row; w += RKV_THREADS) {
    i32 hl = w / L.v_row, j = w % L.v_row, h = g * gh + hl;
    u8* row = page + L.head_off + (i64)h * L.head_bytes + L.v_codes + (i64)slot * L.v_row;
    row[j] = rkv_pack_byte(codes + hl * d, L.vbits, d, j);
  }
}

// Grid (n_tok, G), RKV_THREADS threads. Dynamic shared memory: 3 * n floats + n bytes,
// n = group_heads * d.
RKV_GLOBAL void rkv_append(RkvAppendParams p) {
  RKV_DYN_SMEM(float, sm);
  const i32 t = blockIdx.x, g = blockIdx.y, tid = threadIdx.x;
  const i32 d = p.d, gh = p.group_heads, n = gh * d;
  const RkvSrc src = reinterpret_cast<const RkvSrc*>(p.src)[t];
  const RkvDst dst = reinterpret_cast<const RkvDst*>(p.dst)[t];
  const RkvLayout L = p.lay[dst.cls];
  float* kx = sm;           // keys of the group, model basis, then H x
  float* vx = sm + n;       // values of the group's heads
  float* kst = sm + 2 * n;  // keys in the stored basis
  u8* codes = reinterpret_cast<u8*>(sm + 3 * n);
  u8* page = reinterpret_cast<u8*>(dst.page);

  for (i32 i = tid; i < n; i += RKV_THREADS) {
    i32 h = g * gh + i / d, c = i % d;
    float k = rkv_load(src.k, h * src.k_sh + c * src.k_sc, src.dtype);
    float v = rkv_load(src.v, h * src.v_sh + c * src.v_sc, src.dtype);
    if (src.round) {
      k = rkv_fp16_load(rkv_fp16_store(k, p.pack.fp_format), p.pack.fp_format);
      v = rkv_fp16_load(rkv_fp16_store(v, p.pack.fp_format), p.pack.fp_format);
    }
    kx[i] = k;
    vx[i] = v;
  }
  if (g == 0 && tid == 0) {
    reinterpret_cast<i32*>(page)[dst.slot] = dst.pos;
    page[L.tag_off + dst.slot] = (u8)dst.tag;
  }
  __syncthreads();
  float* key_out = L.per_channel
                       ? reinterpret_cast<float*>(p.key_out) + (i64)dst.key_row * p.heads * d
                       : nullptr;
  rkv_pack_token(kx, vx, kst, codes, page, L, dst.slot, g, gh, d,
                 reinterpret_cast<const u32*>(p.perm), p.pack, key_out);
}

// Tokens into a caller-owned pool (rotatekv.paged.write). Grid (n_tok, G), RKV_THREADS
// threads, shared memory as rkv_append. The slot of each token is read here, on the device.
RKV_GLOBAL void rkv_paged_write(RkvPagedWriteParams p) {
  RKV_DYN_SMEM(float, sm);
  const i32 t = blockIdx.x, g = blockIdx.y, tid = threadIdx.x;
  const i32 d = p.d, gh = p.group_heads, n = gh * d;
  const i64 slot = rkv_load_int(p.slots, t, p.slots_i64);
  if (slot < 0 || slot >= p.num_slots) return;  // padding (-1), or outside the pool
  const i32 u = (i32)(slot % p.block_size);
  u8* page = reinterpret_cast<u8*>(p.pool) + (slot / p.block_size) * p.block_bytes;
  float* kx = sm;
  float* vx = sm + n;
  float* kst = sm + 2 * n;
  u8* codes = reinterpret_cast<u8*>(sm + 3 * n);
  for (i32 i = tid; i < n; i += RKV_THREADS) {
    i32 h = g * gh + i / d, c = i % d;
    kx[i] = rkv_load(p.k, t * p.k_s[0] + h * p.k_s[1] + c * p.k_s[2], p.dtype);
    vx[i] = rkv_load(p.v, t * p.v_s[0] + h * p.v_s[1] + c * p.v_s[2], p.dtype);
  }
  __syncthreads();
  if (p.mode == RKV_PRE_ROPE) {
    // Keys back to before RoPE (rust/src/rope.rs Rope::unapply).
    const i32 rh = p.rot_half;
    const float* inv_freq = reinterpret_cast<const float*>(p.inv_freq);
    const float pos = (float)rkv_load_int(p.positions, t, p.pos_i64);
    const float inv = 1.0f / p.rope_scaling;
    for (i32 w = tid; w < gh * rh; w += RKV_THREADS) {
      i32 hl = w / rh, i = w % rh;
      float sn, cs;
      sincosf(pos * inv_freq[i], &sn, &cs);
      float* x = kx + hl * d;
      float a = x[i], b = x[i + rh];
      x[i] = (a * cs + b * sn) * inv;
      x[i + rh] = (b * cs - a * sn) * inv;
    }
    __syncthreads();
  }
  rkv_pack_token(kx, vx, kst, codes, page, p.lay, u, g, gh, d,
                 reinterpret_cast<const u32*>(p.perm), p.pack, nullptr);
}

// Keys of whole per-channel pages. Grid (n_pages, heads), RKV_THREADS threads; one thread
// per channel row (it owns the row's codes).
RKV_GLOBAL void rkv_channel_keys(RkvChannelParams p) {
  const RkvPage pg = reinterpret_cast<const RkvPage*>(p.pages)[blockIdx.x];
  const RkvLayout L = p.lay[pg.cls];
  const i32 h = blockIdx.y, d = p.d, cap = L.cap, hd = p.heads * d;
  u8* hb = reinterpret_cast<u8*>(pg.data) + L.head_off + (i64)h * L.head_bytes;
  const float* keys = reinterpret_cast<const float*>(p.keys) + (i64)pg.start * hd + h * d;
  for (i32 c = threadIdx.x; c < d; c += RKV_THREADS) {
    float mn = RKV_INF, mx = -RKV_INF;
    for (i32 t = 0; t < cap; ++t) mn = fminf(mn, keys[(i64)t * hd + c]), mx = fmaxf(mx, keys[(i64)t * hd + c]);
    u16 s, z;
    rkv_group_params(mn, mx, L.bits, p.key_clip, &s, &z);
    reinterpret_cast<u16*>(hb + L.k_scale)[c] = s;
    reinterpret_cast<u16*>(hb + L.k_zero)[c] = z;
    float sf = rkv_f16_to_f32(s), zf = rkv_f16_to_f32(z);
    for (i32 t = 0; t < cap; ++t)
      rkv_set_code(hb + c * L.k_row, L.bits, cap, t, rkv_code_of(keys[(i64)t * hd + c], sf, zf, L.bits));
  }
}
