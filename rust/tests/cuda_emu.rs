//! The CUDA kernels, built as host C++ through `cuda/emu`, against the CPU store on fresh
//! random inputs: Hadamard and quantize+pack bit for bit, attention within f32 rounding.
//! These run in CI without a GPU; `pytest -m cuda` repeats the comparisons on a GPU.

use std::collections::HashMap;

use rotatekv::cuda::abi::*;
use rotatekv::cuda::emu;
use rotatekv::device::DevTensor;
use rotatekv::format::{class_index, Layout};
use rotatekv::page::Page;
use rotatekv::simd::{f16_to_f32, f32_to_bf16, f32_to_f16};
use rotatekv::store::{DevAppendArgs, TokenArgs};
use rotatekv::*;

mod common;
use common::{chunk, rope_for, Chunk, Rng};

fn seed() -> u64 {
    // Fresh inputs each run; the seed is printed so a failure can be replayed.
    let s = std::env::var("ROTATEKV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("ROTATEKV_SEED={s}");
    s | 1
}

#[test]
fn struct_sizes_match_the_compiled_header() {
    let rust = [
        std::mem::size_of::<RkvLayout>(),
        std::mem::size_of::<RkvPage>(),
        std::mem::size_of::<RkvSrc>(),
        std::mem::size_of::<RkvDst>(),
        std::mem::size_of::<RkvAppendParams>(),
        std::mem::size_of::<RkvChannelParams>(),
        std::mem::size_of::<RkvAttendParams>(),
        std::mem::size_of::<RkvCombineParams>(),
        std::mem::size_of::<RkvFwhtParams>(),
        std::mem::size_of::<RkvMassParams>(),
        std::mem::size_of::<RkvPagedWriteParams>(),
    ];
    let c = emu::c_sizes();
    for (i, (r, c)) in rust.iter().zip(c).enumerate() {
        assert_eq!(*r as u64, c, "struct {i}");
    }
}

fn run_fwht(x: &[f32], rows: usize, n: usize, inverse: bool, dtype: i32) -> Vec<f32> {
    let enc = |v: f32| match dtype {
        F16 => f32_to_f16(v),
        _ => f32_to_bf16(v),
    };
    let dec = |h: u16| match dtype {
        F16 => f16_to_f32(h),
        _ => simd_bf16(h),
    };
    // Rows larger than the shared memory budget go through global scratch.
    let big = n * 4 > SMEM_DEFAULT;
    let grid = rows.min(3) as u32;
    let mut scratch = vec![0f32; if big { grid as usize * n } else { 0 }];
    let scratch_ptr = if big { scratch.as_mut_ptr() as u64 } else { 0 };
    let smem = if big { 0 } else { n * 4 };
    let run = |x: u64, y: u64| {
        let p = RkvFwhtParams {
            x,
            y,
            rows: rows as i64,
            n: n as i32,
            dtype,
            inverse: inverse as i32,
            pad: 0,
        };
        // SAFETY: x and y hold rows * n elements of dtype, scratch grid * n f32 when used.
        unsafe { emu::fwht(&p, scratch_ptr, grid, smem) };
    };
    if dtype == F32 {
        let mut y = vec![0f32; rows * n];
        run(x.as_ptr() as u64, y.as_mut_ptr() as u64);
        y
    } else {
        let xs: Vec<u16> = x.iter().map(|v| enc(*v)).collect();
        let mut y = vec![0u16; rows * n];
        run(xs.as_ptr() as u64, y.as_mut_ptr() as u64);
        y.iter().map(|h| dec(*h)).collect()
    }
}

fn simd_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[test]
fn fwht_is_bit_identical_to_the_cpu_transform() {
    let mut rng = Rng(seed());
    // Powers of two, the three Paley families, and one size that needs global scratch.
    for n in [
        1usize,
        2,
        8,
        12,
        20,
        28,
        64,
        96,
        160,
        224,
        1024,
        3 * 1024,
        16384,
    ] {
        let h = Hadamard::new(n).unwrap();
        let rows = 1 + rng.below(4);
        let x = rng.vec(rows * n, 3.0);
        for inverse in [false, true] {
            let got = run_fwht(&x, rows, n, inverse, F32);
            for r in 0..rows {
                let mut want = x[r * n..(r + 1) * n].to_vec();
                if inverse {
                    h.inverse(&mut want);
                } else {
                    h.forward(&mut want);
                }
                for (i, (g, w)) in got[r * n..(r + 1) * n].iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "n={n} inv={inverse} row {r} [{i}]"
                    );
                }
            }
            // 16-bit rows: the CPU transform of the decoded row, rounded back.
            for dtype in [F16, BF16] {
                let got = run_fwht(&x, rows, n, inverse, dtype);
                for r in 0..rows {
                    let mut want: Vec<f32> = x[r * n..(r + 1) * n]
                        .iter()
                        .map(|v| {
                            if dtype == F16 {
                                f16_to_f32(f32_to_f16(*v))
                            } else {
                                simd_bf16(f32_to_bf16(*v))
                            }
                        })
                        .collect();
                    if inverse {
                        h.inverse(&mut want);
                    } else {
                        h.forward(&mut want);
                    }
                    for (i, (g, w)) in got[r * n..(r + 1) * n].iter().zip(&want).enumerate() {
                        let w = if dtype == F16 {
                            f16_to_f32(f32_to_f16(*w))
                        } else {
                            simd_bf16(f32_to_bf16(*w))
                        };
                        assert_eq!(g.to_bits(), w.to_bits(), "n={n} dtype {dtype} [{i}]");
                    }
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Case {
    hkv: usize,
    gqa: usize,
    d: usize,
    batch: usize,
    bits: u8,
    mode: Mode,
    group_heads: Option<usize>,
    rotate_values: bool,
    layout: KeyLayout,
    residual: usize,
    group: Option<usize>,
    page: Option<usize>,
    chunks: Vec<usize>,
    tq: usize,
    protect: bool,
    valid: bool,
    mixed_bits: bool,
    window: Option<usize>,
    softcap: Option<f32>,
    partial_rope: bool,
    fp_format: FpFormat,
}

fn base(bits: u8, mode: Mode) -> Case {
    Case {
        hkv: 2,
        gqa: 2,
        d: 64,
        batch: 2,
        bits,
        mode,
        group_heads: None,
        rotate_values: true,
        layout: KeyLayout::PerToken,
        residual: 0,
        group: None,
        page: None,
        chunks: vec![37, 1, 50],
        tq: 1,
        protect: false,
        valid: false,
        mixed_bits: false,
        window: None,
        softcap: None,
        partial_rope: false,
        fp_format: FpFormat::F16,
    }
}

fn build(c: &Case, rng: &mut Rng) -> (KVStore, Vec<Chunk>) {
    let plan = if c.mode == Mode::None {
        RotationPlan::identity(2, c.hkv, c.d).unwrap()
    } else {
        let mut p =
            RotationPlan::hadamard(2, c.hkv, c.d, c.mode, c.group_heads, c.rotate_values).unwrap();
        let n = p.group_len();
        for l in 0..2 {
            for g in p.key_perm[l].chunks_mut(n) {
                for i in (1..n).rev() {
                    g.swap(i, rng.below(i + 1));
                }
            }
        }
        p.key_clip[1] = 0.9;
        p.value_clip[1] = 0.95;
        p
    };
    let cfg = QuantConfig {
        bits: c.bits,
        group_size: c.group,
        residual: c.residual,
        key_layout: c.layout,
        page_tokens: c.page,
        fp_format: c.fp_format,
        ..Default::default()
    };
    let rope = Some(rope_for(c.d, c.partial_rope));
    let mut store = KVStore::new(2, c.batch, c.hkv, c.d, cfg, plan, rope).unwrap();
    let mut next = vec![0i64; c.batch];
    let mut chunks = Vec::new();
    for &t in &c.chunks {
        // 16-bit-representable values, so that tokens staged through the store's 16-bit
        // window quantize from the same values the kernel reads.
        let ch = chunk(
            rng,
            (c.batch, c.hkv, t, c.d),
            &mut next,
            c.valid,
            Some(c.fp_format),
        );
        let kv = View4::contiguous("k", Data::F32(&ch.k), [c.batch, c.hkv, t, c.d]).unwrap();
        let vv = View4::contiguous("v", Data::F32(&ch.v), [c.batch, c.hkv, t, c.d]).unwrap();
        for layer in 0..2 {
            store
                .append(
                    layer,
                    &AppendArgs {
                        k: kv,
                        v: vv,
                        positions: Some(&ch.pos),
                        protect: c.protect.then_some(&ch.protect[..]),
                        valid: c.valid.then_some(&ch.valid[..]),
                        bits: c.mixed_bits.then_some(&ch.bits[..]),
                    },
                )
                .unwrap();
        }
        chunks.push(ch);
    }
    (store, chunks)
}

/// Rewrites every live token of `layer` with the emulated append kernels into fresh zeroed
/// pages, from the original inputs (16-bit sources), and returns the pages' bytes.
fn emulate_append(store: &KVStore, layer: usize, chunks: &[Chunk]) -> Vec<Vec<Vec<u8>>> {
    let m = &store.meta;
    let (h, d) = (m.heads, m.d);
    let fmt = fp_code(m.cfg.fp_format);
    // The 16-bit sources, [B, H, T, D] per chunk, and where each (sequence, position) lies.
    let src16: Vec<(Vec<u16>, Vec<u16>)> = chunks
        .iter()
        .map(|c| {
            let e = |x: &f32| m.cfg.fp_format.encode(*x);
            (c.k.iter().map(e).collect(), c.v.iter().map(e).collect())
        })
        .collect();
    let mut at: HashMap<(usize, i64), (usize, usize)> = HashMap::new();
    for (ci, c) in chunks.iter().enumerate() {
        for b in 0..m.batch {
            for t in 0..c.t {
                if c.valid[b * c.t + t] {
                    at.insert((b, c.pos[b * c.t + t]), (ci, t));
                }
            }
        }
    }
    let lay = layouts(m);
    let perm = &m.plan.key_perm[layer];
    let mut out = Vec::new();
    for b in 0..m.batch {
        let pages: Vec<&Page> = store.layers[layer][b]
            .all_pages()
            .map(|p| p.as_ref())
            .collect();
        let mut bufs: Vec<Vec<u64>> = pages.iter().map(|p| vec![0u64; p.nbytes() / 8]).collect();
        // Tokens in per-channel pages go first, page by page and slot by slot, so that the
        // stored-basis keys the append kernel writes line up as [page][slot].
        let mut srcs = Vec::new();
        let mut dsts = Vec::new();
        let mut channel_pages = Vec::new();
        for pass in [true, false] {
            for (pi, p) in pages.iter().enumerate() {
                let lc = &m.layouts[class_index(p.bits)];
                if (lc.per_channel && p.bits < 16) != pass {
                    continue;
                }
                if pass {
                    channel_pages.push(pi);
                }
                for u in p.start..p.len {
                    let pos = p.positions()[u] as i64;
                    let (ci, t) = at[&(b, pos)];
                    let c = &chunks[ci];
                    let off = ((b * h) * c.t + t) * d;
                    srcs.push(RkvSrc {
                        k: src16[ci].0[off..].as_ptr() as u64,
                        v: src16[ci].1[off..].as_ptr() as u64,
                        k_sh: (c.t * d) as i64,
                        k_sc: 1,
                        v_sh: (c.t * d) as i64,
                        v_sc: 1,
                        dtype: fmt,
                        round: 0,
                    });
                    dsts.push(RkvDst {
                        page: bufs[pi].as_mut_ptr() as u64,
                        cls: class_index(p.bits) as i32,
                        slot: u as i32,
                        pos: pos as i32,
                        tag: p.tags()[u] as i32,
                        key_row: if pass { dsts.len() as i32 } else { -1 },
                        pad: 0,
                    });
                }
            }
        }
        let (kclip, vclip) = (
            m.cfg.key_clip.unwrap_or(m.plan.key_clip[layer]),
            m.cfg.value_clip.unwrap_or(m.plan.value_clip[layer]),
        );
        let mut key_out = vec![0f32; dsts.len() * h * d];
        let p = RkvAppendParams {
            src: srcs.as_ptr() as u64,
            dst: dsts.as_ptr() as u64,
            perm: perm.as_ptr() as u64,
            key_out: key_out.as_mut_ptr() as u64,
            n_tok: dsts.len() as i32,
            heads: h as i32,
            d: d as i32,
            group_heads: m.plan.group_heads as i32,
            pack: RkvPack {
                rotate_keys: m.plan.rotates_keys() as i32,
                rotate_values: m.plan.rotate_values as i32,
                fp_format: fmt,
                pad: 0,
                key_clip: kclip,
                value_clip: vclip,
            },
            lay,
        };
        if !dsts.is_empty() {
            let (grid, smem) = append_shape(m, dsts.len());
            // SAFETY: sources, destinations, pages, perm and key_out are live host buffers
            // of the sizes the parameters describe.
            unsafe { emu::append(&p, grid, smem) };
        }
        if !channel_pages.is_empty() {
            let cap = m.cap as i32;
            let pages: Vec<RkvPage> = channel_pages
                .iter()
                .enumerate()
                .map(|(j, &i)| RkvPage {
                    data: bufs[i].as_ptr() as u64,
                    cls: class_index(pages[i].bits) as i32,
                    start: j as i32 * cap,
                    len: cap,
                    pad: 0,
                })
                .collect();
            let cp = RkvChannelParams {
                keys: key_out.as_ptr() as u64,
                pages: pages.as_ptr() as u64,
                n_pages: pages.len() as i32,
                heads: h as i32,
                d: d as i32,
                pad: 0,
                key_clip: kclip,
                pad1: 0.0,
                lay,
            };
            // SAFETY: key_out holds n_pages * cap rows; the pages are live buffers.
            unsafe { emu::channel_keys(&cp) };
        }
        out.push(
            bufs.iter()
                .map(|b| bytemuck::cast_slice(b).to_vec())
                .collect(),
        );
    }
    out
}

fn check_append(c: &Case, seed: u64) {
    let mut rng = Rng(seed);
    let (store, chunks) = build(c, &mut rng);
    for layer in 0..2 {
        let got = emulate_append(&store, layer, &chunks);
        for (b, pages) in got.iter().enumerate() {
            let cpu: Vec<&Page> = store.layers[layer][b]
                .all_pages()
                .map(|p| p.as_ref())
                .collect();
            assert_eq!(pages.len(), cpu.len());
            for (i, (g, w)) in pages.iter().zip(&cpu).enumerate() {
                let lay = &store.meta.layouts[class_index(w.bits)];
                let want = w.bytes();
                if w.start == 0 {
                    for (o, (x, y)) in g.iter().zip(want).enumerate() {
                        assert!(
                            x == y,
                            "{c:?} layer {layer} seq {b} page {i} ({} bits) byte {o}: {x} != {y}",
                            w.bits
                        );
                    }
                } else {
                    // A window page drained from the front: its slots before `start` are
                    // stale on the CPU, so compare the live slots only (16-bit pages).
                    assert_eq!(w.bits, 16);
                    for u in w.start..w.len {
                        assert_eq!(slot16(g, lay, u), slot16(want, lay, u), "{c:?} slot {u}");
                    }
                }
            }
        }
    }
}

/// The bytes of slot `u` of a 16-bit page: position, tag, and every head's key and value.
fn slot16(bytes: &[u8], lay: &Layout, u: usize) -> Vec<u8> {
    let mut out = bytes[4 * u..4 * u + 4].to_vec();
    out.push(bytes[lay.tag_off + u]);
    for h in 0..lay.heads {
        let hb = lay.head(h);
        for c in 0..lay.d {
            let k = hb + 2 * (c * lay.cap + u);
            out.extend_from_slice(&bytes[k..k + 2]);
        }
        let v = hb + lay.v_codes + 2 * u * lay.d;
        out.extend_from_slice(&bytes[v..v + 2 * lay.d]);
    }
    out
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for bits in [2u8, 3, 4, 8, 16] {
        for mode in [Mode::PreRope, Mode::PostRope, Mode::None] {
            v.push(base(bits, mode));
        }
    }
    let mut c = base(2, Mode::PreRope);
    c.hkv = 4;
    c.group_heads = Some(2);
    c.gqa = 1;
    c.group = Some(32);
    v.push(c);
    let mut c = base(3, Mode::PostRope);
    c.d = 96; // Paley transform (12 * 8)
    c.hkv = 1;
    c.gqa = 3;
    v.push(c);
    let mut c = base(2, Mode::PreRope);
    c.protect = true;
    c.valid = true;
    c.mixed_bits = true;
    c.fp_format = FpFormat::BF16;
    v.push(c);
    let mut c = base(2, Mode::PreRope);
    c.residual = 16;
    c.page = Some(32);
    v.push(c);
    // Per-head post-RoPE plan (rotated-query path) with 16-bit and mixed-class pages.
    let mut c = base(2, Mode::PostRope);
    c.protect = true;
    c.mixed_bits = true;
    c.residual = 8;
    v.push(c);
    let mut c = base(2, Mode::PostRope);
    c.layout = KeyLayout::PerChannel;
    c.rotate_values = false;
    c.chunks = vec![70, 3, 40];
    v.push(c);
    let mut c = base(4, Mode::PreRope);
    c.d = 128;
    c.hkv = 2;
    c.gqa = 4;
    c.partial_rope = true;
    v.push(c);
    v
}

#[test]
fn append_kernel_writes_the_cpu_store_bytes() {
    let s = seed();
    for (i, c) in cases().iter().enumerate() {
        check_append(c, s.wrapping_add(i as u64) | 1);
    }
}

/// Runs the emulated attention (+ combine) over the CPU store's own pages.
#[allow(clippy::too_many_arguments)]
fn emulate_attend(
    store: &KVStore,
    layer: usize,
    q: &[f32],
    hq: usize,
    tq: usize,
    qpos: &[i32],
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
    splits: usize,
) -> Vec<f32> {
    let m = &store.meta;
    let d = m.d;
    let mut pages = Vec::new();
    let mut page_off = vec![0i32];
    for s in &store.layers[layer] {
        for p in s.all_pages().filter(|p| p.live() > 0) {
            pages.push(RkvPage {
                data: p.bytes().as_ptr() as u64,
                cls: class_index(p.bits) as i32,
                start: p.start as i32,
                len: p.len as i32,
                pad: 0,
            });
        }
        page_off.push(pages.len() as i32);
    }
    let (rows, tile, smem) = attend_tiles(m, hq, tq);
    let mut work = vec![0f32; m.batch * splits * hq * tq * (d + 2)];
    let rope = m.rope.as_ref();
    let inv_freq: Vec<f32> = rope.map(|r| r.inv_freq.clone()).unwrap_or_default();
    let p = RkvAttendParams {
        q: q.as_ptr() as u64,
        pages: pages.as_ptr() as u64,
        page_off: page_off.as_ptr() as u64,
        qpos: qpos.as_ptr() as u64,
        perm: m.plan.key_perm[layer].as_ptr() as u64,
        inv_freq: inv_freq.as_ptr() as u64,
        work: work.as_mut_ptr() as u64,
        q_s: [(hq * tq * d) as i64, (tq * d) as i64, d as i64, 1],
        batch: m.batch as i32,
        hq: hq as i32,
        tq: tq as i32,
        d: d as i32,
        heads: m.heads as i32,
        group_heads: m.plan.group_heads as i32,
        q_dtype: F32,
        fp_format: fp_code(m.cfg.fp_format),
        mode: mode_code(m.plan.mode),
        rotate_keys: m.plan.rotates_keys() as i32,
        rotate_values: m.plan.rotate_values as i32,
        rot_half: inv_freq.len() as i32,
        causal: 1,
        window: window.map_or(0, |w| w as i32),
        splits: splits as i32,
        rows_per_block: rows as i32,
        tile_tokens: tile as i32,
        pad0: 0,
        scale,
        softcap: softcap.unwrap_or(0.0),
        rope_scaling: rope.map_or(1.0, |r| r.scaling),
        pad1: 0.0,
        lay: layouts(m),
        ..Default::default()
    };
    let grid = attend_grid(m, m.batch, hq, tq, rows, splits);
    // SAFETY: q, pages (the store's own page bytes, alive for this call), offsets,
    // positions, perm, inv_freq and work are live host buffers of the sizes described.
    unsafe { emu::attend(&p, grid, smem) };
    let mut out = vec![0f32; m.batch * hq * tq * d];
    let cp = RkvCombineParams {
        work: work.as_ptr() as u64,
        out: out.as_mut_ptr() as u64,
        lse: 0,
        query_start: 0,
        o_s: [(hq * tq * d) as i64, (tq * d) as i64, d as i64, 1],
        batch: m.batch as i32,
        hq: hq as i32,
        tq: tq as i32,
        d: d as i32,
        splits: splits as i32,
        o_dtype: F32,
        rotate_values: m.plan.rotate_values as i32,
        pad: 0,
    };
    // SAFETY: work and out are live host buffers of the sizes described.
    unsafe { emu::combine(&cp) };
    out
}

fn check_attend(c: &Case, seed: u64) {
    let mut rng = Rng(seed);
    let (store, chunks) = build(c, &mut rng);
    let hq = c.hkv * c.gqa;
    let q = rng.vec(c.batch * hq * c.tq * c.d, 1.0);
    let scale = 0.7 / (c.d as f32).sqrt();
    // The last tq positions of each sequence.
    let lens: Vec<i64> = (0..c.batch)
        .map(|b| {
            chunks
                .iter()
                .map(|ch| (0..ch.t).filter(|t| ch.valid[b * ch.t + t]).count() as i64)
                .sum()
        })
        .collect();
    let qpos: Vec<i32> = (0..c.batch * c.tq)
        .map(|i| (lens[i / c.tq] - c.tq as i64 + (i % c.tq) as i64).max(0) as i32)
        .collect();
    let qpos64: Vec<i64> = qpos.iter().map(|x| *x as i64).collect();
    for layer in 0..2 {
        let mut want = vec![0f32; q.len()];
        let qv = View4::contiguous("q", Data::F32(&q), [c.batch, hq, c.tq, c.d]).unwrap();
        store
            .attend(
                layer,
                &AttendArgs {
                    q: qv,
                    positions: Some(&qpos64),
                    causal: true,
                    scale: Some(scale),
                    window: c.window,
                    softcap: c.softcap,
                    lag: 0,
                },
                &mut OutData::F32(&mut want),
            )
            .unwrap();
        for splits in [1usize, 3] {
            let got = emulate_attend(
                &store, layer, &q, hq, c.tq, &qpos, scale, c.window, c.softcap, splits,
            );
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            assert!(
                err < 1e-4,
                "{c:?} layer {layer} splits {splits}: max error {err}"
            );
        }
    }
}

#[test]
fn attention_kernel_matches_the_cpu_attention() {
    let s = seed();
    let mut all = cases();
    let mut c = base(2, Mode::PreRope);
    c.tq = 5;
    c.window = Some(20);
    c.softcap = Some(5.0);
    c.gqa = 3;
    all.push(c);
    let mut c = base(4, Mode::PostRope);
    c.tq = 40;
    c.chunks = vec![20, 60];
    all.push(c);
    for (i, c) in all.iter().enumerate() {
        check_attend(c, s.wrapping_add(100 + i as u64) | 1);
    }
}

fn dev_tensor(x: &[f32], shape: [usize; 4]) -> DevTensor {
    DevTensor {
        ptr: x.as_ptr() as u64,
        shape,
        strides: [
            shape[1] * shape[2] * shape[3],
            shape[2] * shape[3],
            shape[3],
            1,
        ],
        dtype: DType::F32,
    }
}

/// Every page of two stores, bytes and bookkeeping, equal (the device one copied back).
fn assert_same_pages(cpu: &KVStore, dev: &KVStore, what: &str) {
    let host = dev.to_host().unwrap();
    for (l, (a, b)) in cpu.layers.iter().zip(&host.layers).enumerate() {
        for (s, (x, y)) in a.iter().zip(b).enumerate() {
            let px: Vec<&Page> = x.all_pages().map(|p| p.as_ref()).collect();
            let py: Vec<&Page> = y.all_pages().map(|p| p.as_ref()).collect();
            assert_eq!(px.len(), py.len(), "{what}: layer {l} seq {s} page count");
            for (i, (p, q)) in px.iter().zip(&py).enumerate() {
                assert_eq!(
                    (p.bits, p.start, p.len, p.closed, p.min_pos, p.max_pos),
                    (q.bits, q.start, q.len, q.closed, q.min_pos, q.max_pos),
                    "{what}: layer {l} seq {s} page {i}"
                );
                let lay = &cpu.meta.layouts[class_index(p.bits)];
                if p.start == 0 {
                    if let Some(o) = p.bytes().iter().zip(q.bytes()).position(|(a, b)| a != b) {
                        panic!(
                            "{what}: layer {l} seq {s} page {i} ({} bits) byte {o}",
                            p.bits
                        );
                    }
                } else {
                    for u in p.start..p.len {
                        assert_eq!(
                            slot16(p.bytes(), lay, u),
                            slot16(q.bytes(), lay, u),
                            "{what}"
                        );
                    }
                }
            }
        }
    }
}

/// A device store (emulated) fed the same appends as the CPU store holds the same pages,
/// and attends within f32 rounding of it, through reorder, more appends and truncate.
fn check_device_store(c: &Case, seed: u64) {
    let mut rng = Rng(seed);
    let (cpu, chunks) = build(c, &mut rng);
    let backend = rotatekv::cuda::backend::EmuBackend::shared();
    let empty = KVStore::new(
        2,
        c.batch,
        c.hkv,
        c.d,
        cpu.meta.cfg.clone(),
        cpu.meta.plan.clone(),
        cpu.meta.rope.clone(),
    )
    .unwrap();
    let mut dev = empty.to_device(&backend).unwrap();
    assert_eq!(dev.device_name(), "emu");
    for ch in &chunks {
        let shape = [c.batch, c.hkv, ch.t, c.d];
        for layer in 0..2 {
            dev.append_device(
                layer,
                &DevAppendArgs {
                    k: dev_tensor(&ch.k, shape),
                    v: dev_tensor(&ch.v, shape),
                    tokens: TokenArgs {
                        positions: Some(&ch.pos),
                        protect: c.protect.then_some(&ch.protect[..]),
                        valid: c.valid.then_some(&ch.valid[..]),
                        bits: c.mixed_bits.then_some(&ch.bits[..]),
                    },
                },
            )
            .unwrap();
        }
    }
    assert_same_pages(&cpu, &dev, &format!("{c:?}"));
    assert_eq!(cpu.nbytes(), dev.nbytes());
    let hq = c.hkv * c.gqa;
    let mut cpu = cpu;
    for round in 0..2 {
        let q = rng.vec(c.batch * hq * c.tq * c.d, 1.0);
        let shape = [c.batch, hq, c.tq, c.d];
        // The second round masks each query's newest keys and returns log-sum-exps.
        let lag = if round == 1 && c.window.is_none_or(|w| w > 2) {
            2
        } else {
            0
        };
        let opts = rotatekv::attend::Options {
            positions: None,
            causal: true,
            scale: None,
            window: c.window,
            softcap: c.softcap,
            lag,
        };
        for layer in 0..2 {
            let mut want = vec![0f32; q.len()];
            let mut want_lse = vec![0f32; c.batch * hq * c.tq];
            let qv = View4::contiguous("q", Data::F32(&q), shape).unwrap();
            let args = AttendArgs {
                q: qv,
                positions: None,
                causal: true,
                scale: None,
                window: c.window,
                softcap: c.softcap,
                lag,
            };
            cpu.attend_lse(layer, &args, &mut OutData::F32(&mut want), &mut want_lse)
                .unwrap();
            let got = vec![0f32; q.len()];
            let got_lse = vec![0f32; want_lse.len()];
            dev.attend_device(
                layer,
                &dev_tensor(&q, shape),
                &dev_tensor(&got, shape),
                Some(&dev_tensor(&got_lse, [c.batch, hq, c.tq, 1])),
                &opts,
            )
            .unwrap();
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            assert!(
                err < 1e-4,
                "{c:?} round {round} layer {layer}: max error {err}"
            );
            for (g, w) in got_lse.iter().zip(&want_lse) {
                assert!(
                    (g == w) || (g - w).abs() < 1e-4 * w.abs().max(1.0),
                    "{c:?} round {round} layer {layer}: lse {g} != {w}"
                );
            }
        }
        if round == 0 {
            // Beam-search reorder (pages shared, then copied on write), one more token,
            // then a truncate that compacts pages.
            let idx: Vec<i64> = (0..c.batch as i64)
                .map(|i| (i + 1) % c.batch as i64)
                .rev()
                .collect();
            cpu.reorder(&idx).unwrap();
            dev.reorder(&idx).unwrap();
            let t = 3;
            let n = c.batch * c.hkv * t * c.d;
            let k: Vec<f32> = rng
                .vec(n, 1.0)
                .into_iter()
                .map(|x| c.fp_format.round(x))
                .collect();
            let v: Vec<f32> = rng
                .vec(n, 1.0)
                .into_iter()
                .map(|x| c.fp_format.round(x))
                .collect();
            let shape = [c.batch, c.hkv, t, c.d];
            for layer in 0..2 {
                let kv = View4::contiguous("k", Data::F32(&k), shape).unwrap();
                let vv = View4::contiguous("v", Data::F32(&v), shape).unwrap();
                let a = AppendArgs {
                    k: kv,
                    v: vv,
                    positions: None,
                    protect: None,
                    valid: None,
                    bits: None,
                };
                cpu.append(layer, &a).unwrap();
                let da = DevAppendArgs {
                    k: dev_tensor(&k, shape),
                    v: dev_tensor(&v, shape),
                    tokens: TokenArgs::default(),
                };
                dev.append_device(layer, &da).unwrap();
            }
            let cut: Vec<i64> = (0..c.batch as i64).map(|i| 30 + 7 * i).collect();
            cpu.truncate(&cut).unwrap();
            dev.truncate(&cut).unwrap();
            assert_same_pages(&cpu, &dev, &format!("{c:?} after reorder/append/truncate"));
        }
    }
}

#[test]
fn device_store_matches_the_cpu_store() {
    let s = seed();
    let mut all = cases();
    let mut c = base(2, Mode::PreRope);
    c.tq = 4;
    c.window = Some(25);
    all.push(c);
    for (i, c) in all.iter().enumerate() {
        check_device_store(c, s.wrapping_add(200 + i as u64) | 1);
    }
}

#[test]
fn host_calls_on_a_device_store_are_refused() {
    let backend = rotatekv::cuda::backend::EmuBackend::shared();
    let plan = RotationPlan::identity(1, 2, 32).unwrap();
    let s = KVStore::new(1, 1, 2, 32, QuantConfig::default(), plan, None).unwrap();
    let mut d = s.to_device(&backend).unwrap();
    let x = vec![0f32; 2 * 32];
    let v = View4::contiguous("k", Data::F32(&x), [1, 2, 1, 32]).unwrap();
    let a = AppendArgs {
        k: v,
        v,
        positions: None,
        protect: None,
        valid: None,
        bits: None,
    };
    assert!(matches!(d.append(0, &a), Err(Error::Device { .. })));
    let mut out = vec![0f32; 64];
    let args = AttendArgs {
        q: v,
        positions: None,
        causal: true,
        scale: None,
        window: None,
        softcap: None,
        lag: 0,
    };
    assert!(matches!(
        d.attend(0, &args, &mut OutData::F32(&mut out)),
        Err(Error::Device { .. })
    ));
    let mut h = s.clone();
    let da = DevAppendArgs {
        k: dev_tensor(&x, [1, 2, 1, 32]),
        v: dev_tensor(&x, [1, 2, 1, 32]),
        tokens: TokenArgs::default(),
    };
    assert!(matches!(h.append_device(0, &da), Err(Error::Device { .. })));
}

#[test]
fn attention_mass_kernels_match_the_cpu_kernel() {
    use rotatekv::cuda::backend::EmuBackend;
    use rotatekv::cuda::launch::{attention_mass as device_mass, MassBuffers};
    use rotatekv::saliency::{attention_mass, MassArgs, MassDims};
    let mut rng = Rng(seed());
    let backend = EmuBackend::shared();
    // Odd sizes, GQA, a chunk after earlier tokens (prior), windows, soft-capping, lags,
    // padding, more keys than one block of threads.
    for case in 0..6 {
        let hkv = 1 + rng.below(3);
        let dims = MassDims {
            b: 1 + rng.below(2),
            hq: hkv * (1 + rng.below(3)),
            tq: 1 + rng.below(20),
            hkv,
            tk: 0,
            d: 1 + rng.below(40),
        };
        let dims = MassDims {
            tk: dims.tq + rng.below(if case == 0 { 200 } else { 20 }),
            ..dims
        };
        let MassDims {
            b, hq, tq, tk, d, ..
        } = dims;
        let q = rng.vec(b * hq * tq * d, 2.0);
        let k = rng.vec(b * hkv * tk * d, 2.0);
        let mut k_pos = Vec::new();
        let mut q_pos = Vec::new();
        for _ in 0..b {
            let base = rng.below(30) as i64;
            let ks: Vec<i64> = (0..tk as i64).map(|j| base + 2 * j).collect();
            q_pos.extend_from_slice(&ks[tk - tq..]);
            k_pos.extend(ks);
        }
        let valid: Vec<bool> = (0..b * tk).map(|_| rng.below(8) > 0).collect();
        let valid_u8: Vec<u8> = valid.iter().map(|v| *v as u8).collect();
        let prior = rng.vec(b * hq * tq, 3.0);
        let extras = case % 2 == 1;
        let window = (case >= 3).then(|| 1 + rng.below(12));
        let softcap = (case >= 2).then_some(1.7f32);
        let lag = rng.below(6);
        let args = MassArgs {
            q: &q,
            k: &k,
            dims,
            q_pos: &q_pos,
            k_pos: &k_pos,
            k_valid: extras.then_some(&valid[..]),
            prior_lse: extras.then_some(&prior[..]),
            scale: 0.4,
            softcap,
            window,
            lag,
        };
        let want = attention_mass(&args).unwrap();
        let mut lse = vec![0f32; b * hq * tq];
        let mut mass = vec![0f32; b * tk];
        let mut count = vec![0i32; b * tk];
        let buf = MassBuffers {
            q: q.as_ptr() as u64,
            k: k.as_ptr() as u64,
            q_pos: q_pos.as_ptr() as u64,
            k_pos: k_pos.as_ptr() as u64,
            k_valid: if extras { valid_u8.as_ptr() as u64 } else { 0 },
            prior: if extras { prior.as_ptr() as u64 } else { 0 },
            lse: lse.as_mut_ptr() as u64,
            mass: mass.as_mut_ptr() as u64,
            count: count.as_mut_ptr() as u64,
        };
        device_mass(&backend, &buf, dims, 0.4, softcap, window, lag).unwrap();
        let ctx = format!("case {case}: {dims:?} window {window:?} lag {lag}");
        let got: Vec<u32> = count.iter().map(|c| *c as u32).collect();
        assert_eq!(got, want.count, "{ctx}");
        for (g, w) in mass.iter().zip(&want.mass) {
            assert!(
                (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{ctx}: mass {g} vs {w}"
            );
        }
        for (g, w) in lse.iter().zip(&want.lse) {
            assert!(
                (g.is_infinite() && g == w) || (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{ctx}: lse {g} vs {w}"
            );
        }
    }
}
