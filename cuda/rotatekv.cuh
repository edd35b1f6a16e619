// Shared definitions of the rotatekv CUDA kernels.
//
// Every kernel file includes this header. The same sources compile two ways:
// * NVRTC, for the GPU (`__CUDACC__` is defined); the extension embeds them and replaces the
//   include line with this file's text, so NVRTC needs no include path;
// * host C++ through `emu/cuda_emu.h`, which runs a block's threads as host threads, so the
//   Rust tests run every kernel against the CPU store on machines without a GPU.
//
// The parameter structs below are mirrored field by field by `rust/src/cuda/abi.rs`
// (`#[repr(C)]`); both sides check the sizes. Block layouts are those of `rust/src/format.rs`.
#pragma once

#ifdef __CUDACC__
#define RKV_DEV __device__ __forceinline__
#define RKV_GLOBAL extern "C" __global__
// Quantization must round exactly as the CPU path does: these never contract into FMAs and
// always divide to nearest.
#define RKV_MUL(a, b) __fmul_rn((a), (b))
#define RKV_ADD(a, b) __fadd_rn((a), (b))
#define RKV_SUB(a, b) __fsub_rn((a), (b))
#define RKV_DIV(a, b) __fdiv_rn((a), (b))
#define RKV_SQRT(a) __fsqrt_rn(a)
#define RKV_DYN_SMEM(T, name)                                                        \
  extern __shared__ __align__(16) unsigned char rkv_dyn_smem[];                      \
  T* name = reinterpret_cast<T*>(rkv_dyn_smem)
#else
#define RKV_DEV inline
#define RKV_GLOBAL
#define RKV_MUL(a, b) ((a) * (b))
#define RKV_ADD(a, b) ((a) + (b))
#define RKV_SUB(a, b) ((a) - (b))
#define RKV_DIV(a, b) ((a) / (b))
#define RKV_SQRT(a) sqrtf(a)
#define RKV_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(emu::dyn_smem())
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef long long i64;
typedef unsigned long long u64;

// Element types of tensors crossing the API.
#define RKV_F32 0
#define RKV_F16 1
#define RKV_BF16 2

// Plan modes (rust/src/rotation.rs Mode).
#define RKV_PRE_ROPE 0
#define RKV_POST_ROPE 1
#define RKV_NO_ROTATION 2

// The precision classes come from the one format table (`rust/src/format.rs` CLASS_BITS):
// the extension defines RKV_NUM_CLASSES in front of the NVRTC source, build.rs for the host
// emulation.
#ifndef RKV_NUM_CLASSES
#error "RKV_NUM_CLASSES must be defined from rust/src/format.rs CLASS_BITS"
#endif

// Threads per block of every kernel (four warps).
#define RKV_THREADS 128

// ---------------------------------------------------------------------------------------
// Parameter structs (mirrored in rust/src/cuda/abi.rs).

// One page format: `rust/src/format.rs` Layout, every field an i32. `bits` is the key
// width, `vbits` the value width (16 for both or neither).
struct RkvLayout {
  i32 bits, per_channel, cap, heads, d, group;
  i32 tag_off, head_off, head_bytes, k_row, k_scale, k_zero, v_codes, v_row, v_scale, v_zero;
  i32 total, vbits;
};

// One live page of a sequence, as attention reads it.
struct RkvPage {
  u64 data;   // device address of the page bytes
  i32 cls;    // precision class index (layouts[cls])
  i32 start;  // first live slot
  i32 len;    // one past the last written slot
  i32 pad;
};

// Where one appended token comes from: a strided row of keys and of values, `[H][D]` each.
// Strides are in elements of `dtype`.
struct RkvSrc {
  u64 k, v;
  i64 k_sh, k_sc, v_sh, v_sc;
  i32 dtype;
  i32 round;  // round through the store's 16-bit format first (tokens passing the window)
};

// Where one appended token goes.
struct RkvDst {
  u64 page;  // device address of the page
  i32 cls;   // precision class of the page
  i32 slot;  // slot within the page
  i32 pos;   // position stored with the token
  i32 tag;   // tag byte stored with the token
  i32 key_row;  // per-channel pages: row of key_out for this token's keys, else -1
  i32 pad;
};

// How a layer's tokens are packed: the plan's transforms, the 16-bit format and the clips
// (rkv_append and rkv_paged_write alike).
struct RkvPack {
  i32 rotate_keys, rotate_values, fp_format, pad;
  float key_clip, value_clip;
};

struct RkvAppendParams {
  u64 src;   // RkvSrc[n_tok]
  u64 dst;   // RkvDst[n_tok]
  u64 perm;  // u32[G * n]: stored channel j of group g is channel perm[g*n + j] of H x
  u64 key_out;  // f32 [rows][H*D]: stored-basis keys of tokens bound for per-channel pages
  i32 n_tok, heads, d, group_heads;
  RkvPack pack;
  RkvLayout lay[RKV_NUM_CLASSES];
};

// Keys of whole per-channel (KIVI) pages, from the stored-basis keys that the append kernel
// wrote to `key_out`: page i (pages[i], an RkvPage whose `start` is its first key row) takes
// rows start .. start + cap.
struct RkvChannelParams {
  u64 keys;   // f32 [rows][H*D], stored basis
  u64 pages;  // RkvPage[n_pages]
  i32 n_pages, heads, d, pad;
  float key_clip, pad1;
  RkvLayout lay[RKV_NUM_CLASSES];
};

// Attention reads either a list of store pages (`pages`, `page_off`, `qpos`) or, when
// `block_table` is set, a caller-owned pool of blocks of layout lay[0] through block tables
// read on the device (rotatekv.paged): request b's token j sits in block
// block_table[b * max_blocks + j / block_size] at slot j % block_size, has position j, and
// its queries are rows query_start_loc[b] .. query_start_loc[b+1] of q (the last positions).
struct RkvAttendParams {
  u64 q;           // [B, Hq, Tq, D], element strides q_s, dtype q_dtype (paged: q_s[0] = 0,
                   // q_s[2] the token stride)
  u64 pages;       // RkvPage[page_off[B]]
  u64 page_off;    // i32[B + 1]: sequence b's pages are pages[page_off[b] .. page_off[b+1]]
  u64 qpos;        // i32[B * Tq]
  u64 pool;        // paged: u8 [num_blocks][block_bytes]
  u64 block_table; // paged: i32 [B][max_blocks], 0 for store pages
  u64 seq_lens;    // paged: i32 [B]
  u64 query_start; // paged: i32 [B + 1]
  i64 block_bytes; // paged
  i32 num_blocks, max_blocks, block_size, pad2;
  u64 perm;        // u32[G * n] (this layer)
  u64 inv_freq;    // f32[rot_half] (pre-RoPE plans)
  u64 work;        // f32 partials [B][splits][Hq*Tq][D + 2]
  i64 q_s[4];
  i32 batch, hq, tq, d;
  i32 heads, group_heads, q_dtype, fp_format;
  i32 mode, rotate_keys, rotate_values, rot_half;
  i32 causal, window, splits, rows_per_block;
  i32 tile_tokens, pad0;
  float scale, softcap, rope_scaling, pad1;
  RkvLayout lay[RKV_NUM_CLASSES];
};

struct RkvCombineParams {
  u64 work;  // as in RkvAttendParams
  u64 out;   // [B, Hq, Tq, D], element strides o_s, dtype o_dtype (paged: as q)
  u64 lse;   // 0, or float [B, Hq, Tq] contiguous: each row's log-sum-exp (-inf: no key);
             // paged: [Tq_total, Hq]
  u64 query_start;  // paged: i32 [B + 1] (rows past a request's queries are skipped), or 0
  i64 o_s[4];
  i32 batch, hq, tq, d;
  i32 splits, o_dtype, rotate_values, pad;
};

// Quantize + pack of tokens into a caller-owned pool through a slot mapping read on the
// device (rotatekv.paged.write): token t goes to slot slots[t] (block slot / block_size,
// offset slot % block_size) of blocks of layout `lay`; slots outside 0 .. num_blocks *
// block_size (-1: padding) are skipped. Keys arrive after RoPE: pre-RoPE plans undo it at
// positions[t].
struct RkvPagedWriteParams {
  u64 k, v;        // [T, H, D], element strides k_s / v_s, dtype `dtype`
  u64 slots;       // [T], i64 when slots_i64 else i32
  u64 positions;   // [T], i64 when pos_i64 else i32 (pre-RoPE plans), or 0
  u64 pool;        // u8 [num_blocks][block_bytes]
  u64 perm;        // u32[G * n]
  u64 inv_freq;    // f32[rot_half] (pre-RoPE plans)
  i64 k_s[3], v_s[3];
  i64 block_bytes, num_slots;
  i32 n_tok, heads, d, group_heads;
  i32 dtype, slots_i64, pos_i64, block_size;
  i32 mode, rot_half;
  RkvPack pack;
  float rope_scaling, pad1;
  RkvLayout lay;
};

// Grouped Walsh-Hadamard transform of `rows` rows of `n` contiguous elements, in place or
// out of place, in f32, f16 or bf16.
struct RkvFwhtParams {
  u64 x, y;
  i64 rows;
  i32 n, dtype, inverse, pad;
};

// Attention mass of a chunk's keys (cuda/saliency.cu). Every array is contiguous.
struct RkvMassParams {
  u64 q;        // f32 [B, Hq, Tq, D]
  u64 k;        // f32 [B, Hkv, Tk, D]
  u64 q_pos;    // i64 [B, Tq]
  u64 k_pos;    // i64 [B, Tk]
  u64 k_valid;  // u8 [B, Tk], or 0: every key exists
  u64 prior;    // f32 [B, Hq, Tq] log-sum-exp over keys outside the chunk, or 0
  u64 lse;      // f32 [B, Hq, Tq]: written by rkv_mass_lse, read by rkv_mass_keys
  u64 mass;     // f32 [B, Tk]
  u64 count;    // i32 [B, Tk]
  i32 batch, hq, tq, hkv, tk, d;
  i32 window;   // 0: no sliding window
  i32 lag;
  float scale, softcap;  // softcap 0: none
};

// ---------------------------------------------------------------------------------------
// 16-bit floats, bit-exact with rust/src/simd.rs (round to nearest even) on both sides.

RKV_DEV float rkv_bits_f32(u32 b) {
#ifdef __CUDACC__
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, 4);
  return f;
#endif
}

RKV_DEV u32 rkv_f32_bits(float f) {
#ifdef __CUDACC__
  return __float_as_uint(f);
#else
  u32 b;
  memcpy(&b, &f, 4);
  return b;
#endif
}

#define RKV_INF rkv_bits_f32(0x7f800000u)

RKV_DEV float rkv_f16_to_f32(u16 h) {
  u32 sign = (u32)(h & 0x8000u) << 16;
  u32 em = (u32)(h & 0x7fffu) << 13;
  u32 exp = em & (0x7c00u << 13);
  float v;
  if (exp == (0x7c00u << 13)) {
    v = rkv_bits_f32(em + (224u << 23));
  } else if (exp == 0) {
    v = rkv_bits_f32(em + (113u << 23)) - rkv_bits_f32(113u << 23);
  } else {
    v = rkv_bits_f32(em + ((127u - 15u) << 23));
  }
  return rkv_bits_f32(rkv_f32_bits(v) | sign);
}

RKV_DEV u16 rkv_f32_to_f16(float f) {
  u32 x = rkv_f32_bits(f);
  u32 sign = (x >> 16) & 0x8000u;
  u32 ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (u16)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN
  if (ax >= 0x47800000u) return (u16)(sign | 0x7c00u);  // overflow (>= 65536) or inf
  if (ax >= 0x38800000u) {  // normal f16
    u32 mant = ax & 0x7fffffu;
    u32 e = (ax >> 23) - 112u;
    u32 h = (e << 10) | (mant >> 13);
    u32 rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1;  // may carry into inf
    return (u16)(sign | h);
  }
  if (ax < 0x33000000u) return (u16)sign;  // below half the smallest subnormal
  // Subnormal f16: shift the full mantissa down, round to nearest even.
  u32 e = ax >> 23;
  u32 mant = (ax & 0x7fffffu) | 0x800000u;
  u32 shift = 126u - e;  // 14..24
  u32 h = mant >> shift;
  u32 rem = mant & ((1u << shift) - 1u);
  u32 half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (h & 1u))) h += 1;
  return (u16)(sign | h);
}

RKV_DEV float rkv_bf16_to_f32(u16 h) { return rkv_bits_f32((u32)h << 16); }

RKV_DEV u16 rkv_f32_to_bf16(float f) {
  u32 x = rkv_f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);  // quiet NaN
  u32 r = x + 0x7fffu + ((x >> 16) & 1u);
  return (u16)(r >> 16);
}

RKV_DEV float rkv_fp16_load(u16 h, i32 fmt) {
  return fmt == RKV_BF16 ? rkv_bf16_to_f32(h) : rkv_f16_to_f32(h);
}

RKV_DEV u16 rkv_fp16_store(float f, i32 fmt) {
  return fmt == RKV_BF16 ? rkv_f32_to_bf16(f) : rkv_f32_to_f16(f);
}

// Element `i` of a tensor of `dtype` at `base`.
RKV_DEV float rkv_load(u64 base, i64 i, i32 dtype) {
  if (dtype == RKV_F32) return reinterpret_cast<const float*>(base)[i];
  u16 h = reinterpret_cast<const u16*>(base)[i];
  return rkv_fp16_load(h, dtype);
}

// Element `i` of an integer tensor: int64 when `wide`, else int32.
RKV_DEV i64 rkv_load_int(u64 base, i64 i, i32 wide) {
  return wide ? reinterpret_cast<const i64*>(base)[i] : (i64)reinterpret_cast<const i32*>(base)[i];
}

RKV_DEV void rkv_store(u64 base, i64 i, i32 dtype, float v) {
  if (dtype == RKV_F32) {
    reinterpret_cast<float*>(base)[i] = v;
  } else {
    reinterpret_cast<u16*>(base)[i] = rkv_fp16_store(v, dtype);
  }
}

// ---------------------------------------------------------------------------------------
// Packed codes (rust/src/quant.rs): code `i` of a row of `n` codes.

RKV_DEV u32 rkv_get_code(const u8* row, i32 bits, i32 n, i32 i) {
  switch (bits) {
    case 8:
      return row[i];
    case 4: {
      i32 q = n / 2;
      return (row[i % q] >> (4 * (i / q))) & 15u;
    }
    case 2: {
      i32 q = n / 4;
      return (row[i % q] >> (2 * (i / q))) & 3u;
    }
    default: {  // 3 bits: a 2-bit row of the low bits, then a plane of the high bits
      i32 q = n / 4, q8 = n / 8;
      u32 lo = (row[i % q] >> (2 * (i / q))) & 3u;
      u32 hi = (row[q + i % q8] >> (i / q8)) & 1u;
      return lo | (hi << 2);
    }
  }
}

// Where code `i` of a row of `n` codes lives: byte offsets and shifts of its (up to two)
// pieces. `nb` pieces; the 3-bit format splits a code into a 2-bit and a 1-bit piece.
struct RkvCodeBits {
  i32 byte0, shift0, width0, byte1, shift1, width1;
};

RKV_DEV RkvCodeBits rkv_code_bits(i32 bits, i32 n, i32 i) {
  RkvCodeBits c;
  c.byte1 = -1;
  c.shift1 = 0;
  c.width1 = 0;
  switch (bits) {
    case 8:
      c.byte0 = i, c.shift0 = 0, c.width0 = 8;
      break;
    case 4:
      c.byte0 = i % (n / 2), c.shift0 = 4 * (i / (n / 2)), c.width0 = 4;
      break;
    case 2:
      c.byte0 = i % (n / 4), c.shift0 = 2 * (i / (n / 4)), c.width0 = 2;
      break;
    default:
      c.byte0 = i % (n / 4), c.shift0 = 2 * (i / (n / 4)), c.width0 = 2;
      c.byte1 = n / 4 + i % (n / 8), c.shift1 = i / (n / 8), c.width1 = 1;
      break;
  }
  return c;
}

// Replaces `width` bits at `shift` of byte `byte` of `row` (4-byte aligned) with `v`, with
// word atomics: other threads may write other codes of the same word concurrently.
RKV_DEV void rkv_put_bits(u8* row, i32 byte, i32 shift, i32 width, u32 v) {
  u32* word = reinterpret_cast<u32*>(row + (byte & ~3));
  u32 sh = 8u * (u32)(byte & 3) + (u32)shift;
  u32 mask = ((1u << width) - 1u) << sh;
  atomicAnd(word, ~mask);
  atomicOr(word, (v << sh) & mask);
}

RKV_DEV void rkv_set_code(u8* row, i32 bits, i32 n, i32 i, u32 code) {
  RkvCodeBits c = rkv_code_bits(bits, n, i);
  rkv_put_bits(row, c.byte0, c.shift0, c.width0, code & ((1u << c.width0) - 1u));
  if (c.byte1 >= 0) rkv_put_bits(row, c.byte1, c.shift1, c.width1, (code >> 2) & 1u);
}

// ---------------------------------------------------------------------------------------
// Quantization of a group (rust/src/quant.rs group_params / code_of), bit-exact.

RKV_DEV float rkv_clampf(float x, float lo, float hi) { return fminf(fmaxf(x, lo), hi); }

RKV_DEV void rkv_group_params(float mn, float mx, i32 bits, float clip, u16* s, u16* z) {
  float lo = rkv_clampf(RKV_MUL(mn, clip), -65504.0f, 65504.0f);
  float hi = rkv_clampf(RKV_MUL(mx, clip), -65504.0f, 65504.0f);
  float maxc = (float)((1 << bits) - 1);
  float scale = fminf(RKV_DIV(RKV_SUB(hi, lo), maxc), 65504.0f);
  *s = rkv_f32_to_f16(scale);
  *z = rkv_f32_to_f16(lo);
}

RKV_DEV u32 rkv_code_of(float x, float scale, float zero, i32 bits) {
  if (scale == 0.0f) return 0;
  float maxc = (float)((1 << bits) - 1);
  float r = rintf(RKV_DIV(RKV_SUB(x, zero), scale));
  return (u32)fminf(fmaxf(r, 0.0f), maxc);
}

// ---------------------------------------------------------------------------------------
// Hadamard transforms (rust/src/hadamard.rs): H_n = (S_m ⊗ W_p) / sqrt(n), n = m * p, m in
// {1, 12, 20, 28}. Radix-2 stages in increasing stride and the dense S_m summed in index
// order reproduce the CPU results bit for bit.

RKV_DEV i32 rkv_paley_m(i32 n) {
  if ((n & (n - 1)) == 0) return 1;
  if (n % 12 == 0 && ((n / 12) & (n / 12 - 1)) == 0) return 12;
  if (n % 20 == 0 && ((n / 20) & (n / 20 - 1)) == 0) return 20;
  return 28;
}

RKV_DEV float rkv_chi(i32 a, i32 q) {
  a = ((a % q) + q) % q;
  if (a == 0) return 0.0f;
  for (i32 x = 1; x < q; ++x)
    if ((x * x) % q == a) return 1.0f;
  return -1.0f;
}

// Entry (i, j) of S_m.
RKV_DEV float rkv_paley(i32 m, i32 i, i32 j) {
  if (m == 1) return 1.0f;
  if (m == 12 || m == 20) {
    i32 q = m - 1;
    float s;
    if (i == 0 && j == 0)
      s = 0.0f;
    else if (i == 0)
      s = 1.0f;
    else if (j == 0)
      s = -1.0f;
    else
      s = rkv_chi(j - i, q);
    return s + (i == j ? 1.0f : 0.0f);
  }
  // m == 28: C ⊗ [[1,-1],[-1,-1]] + I ⊗ [[1,1],[1,-1]], C the conference matrix of order 14.
  i32 bi = i / 2, r = i % 2, bj = j / 2, s = j % 2;
  float c;
  if (bi == 0 && bj == 0)
    c = 0.0f;
  else if (bi == 0 || bj == 0)
    c = 1.0f;
  else
    c = rkv_chi(bj - bi, 13);
  float a = (r == 0 && s == 0) ? 1.0f : -1.0f;
  float id = 0.0f;
  if (bi == bj) id = (r == 1 && s == 1) ? -1.0f : 1.0f;
  return c * a + id;
}

// Transforms `rows` rows of `n` floats (row r at x + r * stride, shared or global memory), in
// place, with the whole block. `inverse` applies Hᵀ; `normalize` multiplies by 1/sqrt(n).
RKV_DEV void rkv_fwht_block(float* x, i32 rows, i32 n, i32 stride, bool inverse,
                            bool normalize) {
  i32 m = rkv_paley_m(n);
  i32 p = n / m;
  i32 tid = threadIdx.x;
  i32 half = n / 2;
  for (i32 len = 1; len < p; len *= 2) {
    for (i32 w = tid; w < rows * half; w += RKV_THREADS) {
      i32 r = w / half, k = w % half;
      // The k-th butterfly of this stage: block of 2*len, offset inside it.
      i32 i = (k / len) * 2 * len + (k % len);
      float* row = x + (i64)r * stride;
      float a = row[i], b = row[i + len];
      row[i] = a + b;
      row[i + len] = a - b;
    }
    __syncthreads();
  }
  if (m > 1) {
    // One thread per (row, column c): it owns the m entries a * p + c, so works in place.
    for (i32 w = tid; w < rows * p; w += RKV_THREADS) {
      i32 r = w / p, c = w % p;
      float* row = x + (i64)r * stride;
      float in[28];
      for (i32 a = 0; a < m; ++a) in[a] = row[a * p + c];
      for (i32 a = 0; a < m; ++a) {
        float acc = 0.0f;
        for (i32 a2 = 0; a2 < m; ++a2) {
          float s = inverse ? rkv_paley(m, a2, a) : rkv_paley(m, a, a2);
          acc = s > 0.0f ? acc + in[a2] : acc - in[a2];
        }
        row[a * p + c] = acc;
      }
    }
    __syncthreads();
  }
  if (normalize) {
    float norm = RKV_DIV(1.0f, RKV_SQRT((float)n));
    for (i32 w = tid; w < rows * n; w += RKV_THREADS) {
      float* v = x + (i64)(w / n) * stride + w % n;
      *v = RKV_MUL(*v, norm);
    }
    __syncthreads();
  }
}
