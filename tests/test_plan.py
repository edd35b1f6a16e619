"""Rotation plans (construction, validation, files) and the Hadamard transform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

import rotatekv
from reference import hadamard_matrix, make_kv, paley, sylvester
from rotatekv import KVStore, QuantConfig, RotationPlan

# ============================================================================================
# The Hadamard transform
# ============================================================================================


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 128, 256, 1024])
def test_hadamard_is_sylvester_over_sqrt_n_for_powers_of_two(n):
    eye = np.eye(n, dtype=np.float32)
    got = rotatekv.hadamard(eye)  # row i = H e_i = column i of H
    want = sylvester(n) / math.sqrt(n)
    np.testing.assert_allclose(got.T, want.numpy(), rtol=0, atol=1e-6)
    # Entry by entry: W[i][j] = (-1)^popcount(i & j).
    i, j = 5 % n, 3 % n
    assert got[j, i] == pytest.approx((-1) ** bin(i & j).count("1") / math.sqrt(n), abs=1e-7)
    # Sylvester's matrix is symmetric: the transform is its own inverse.
    np.testing.assert_allclose(rotatekv.hadamard(eye, inverse=True), got, atol=1e-7)


@pytest.mark.parametrize("n", [12, 24, 192, 20, 80, 320, 28, 56, 448])
def test_hadamard_of_paley_sizes(n):
    eye = np.eye(n, dtype=np.float32)
    fwd = rotatekv.hadamard(eye).astype(np.float64).T
    inv = rotatekv.hadamard(eye, inverse=True).astype(np.float64).T
    np.testing.assert_allclose(fwd, hadamard_matrix(n).numpy(), atol=1e-6)
    np.testing.assert_allclose(fwd @ fwd.T, np.eye(n), atol=1e-5)
    np.testing.assert_allclose(inv, fwd.T, atol=1e-6)
    np.testing.assert_allclose(np.abs(fwd), np.full((n, n), 1 / math.sqrt(n)), atol=1e-6)
    m = next(m for m in (12, 20, 28) if n % m == 0)
    s = paley(m).numpy()
    np.testing.assert_array_equal(s @ s.T, m * np.eye(m))  # the reference is Hadamard
    # Paley I matrices are not symmetric: forward and inverse differ (Paley II is symmetric).
    if m in (12, 20):
        assert np.abs(fwd - inv).max() > 0.1


def test_hadamard_on_batched_arrays_and_round_trip(gen):
    x = torch.randn(3, 5, 128, generator=gen).numpy()
    y = rotatekv.hadamard(x)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, x @ (sylvester(128).numpy().T / math.sqrt(128)), atol=1e-5)
    np.testing.assert_allclose(rotatekv.hadamard(y, inverse=True), x, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    # Non-contiguous input.
    xt = np.ascontiguousarray(x.transpose(2, 0, 1)).transpose(1, 2, 0)
    np.testing.assert_array_equal(rotatekv.hadamard(xt), y)


@pytest.mark.parametrize("n", [3, 6, 36, 100, 65536])
def test_hadamard_rejects_unsupported_sizes(n):
    with pytest.raises(rotatekv.ArgumentError, match="hadamard size") as e:
        rotatekv.hadamard(np.ones((2, n), np.float32))
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("x", [np.ones((2, 8)), [1.0, 2.0]], ids=["float64", "list"])
def test_hadamard_accepts_array_likes_as_float32(x):
    want = rotatekv.hadamard(np.asarray(x, np.float32))
    np.testing.assert_array_equal(rotatekv.hadamard(x), want)


@pytest.mark.parametrize(
    "x", [["a", "b"], {"x": 1}, np.float32(1.0)], ids=["str", "dict", "scalar"]
)
def test_hadamard_non_numeric_input_is_a_rotatekv_error(x):
    with pytest.raises(rotatekv.RotateKVError):
        rotatekv.hadamard(x)


# ============================================================================================
# Plans
# ============================================================================================


def test_identity_plan():
    p = RotationPlan.identity(3, 2, 64)
    assert (p.num_layers, p.num_kv_heads, p.head_dim) == (3, 2, 64)
    assert p.mode == "none" and p.group_heads == 1 and p.rotate_values is False
    perm = p.key_perm
    assert perm.dtype == np.int32 and perm.shape == (3, 128)
    np.testing.assert_array_equal(perm, np.tile(np.arange(128) % 64, (3, 1)))
    assert p.key_clip == [1.0] * 3 and p.value_clip == [1.0] * 3
    assert repr(p) == (
        "RotationPlan(num_layers=3, num_kv_heads=2, head_dim=64, mode='none', "
        "group_heads=1, rotate_values=False)"
    )
    assert p == RotationPlan.identity(3, 2, 64)
    assert p != RotationPlan.identity(2, 2, 64)


@pytest.mark.parametrize(
    "hkv,d,mode,want",
    [
        (3, 64, "pre_rope", 3),  # 192 = 12 * 16
        (8, 128, "pre_rope", 8),
        (5, 128, "pre_rope", 5),  # 640 = 20 * 32
        (7, 64, "pre_rope", 7),  # 448 = 28 * 16
        (6, 128, "pre_rope", 6),  # 768 = 12 * 64
        (9, 64, "pre_rope", 3),  # 576 unsupported; 3 * 64 = 192
        (8, 128, "post_rope", 1),
        (1, 256, "pre_rope", 1),
    ],
)
def test_hadamard_plan_default_group_heads(hkv, d, mode, want):
    p = RotationPlan.hadamard(2, hkv, d, mode=mode)
    assert p.group_heads == want and p.mode == mode and p.rotate_values is True
    gl = want * d
    np.testing.assert_array_equal(p.key_perm, np.tile(np.arange(hkv * d) % gl, (2, 1)))


def test_plan_constructor_with_explicit_fields(gen):
    perm = np.stack([torch.randperm(128, generator=gen).numpy() for _ in range(2)])
    p = RotationPlan(
        2,
        2,
        64,
        mode="post_rope",
        group_heads=2,
        rotate_values=False,
        key_perm=torch.from_numpy(perm),
        key_clip=[0.9, 0.8],
        value_clip=0.95,
    )
    np.testing.assert_array_equal(p.key_perm, perm)
    assert p.key_clip == pytest.approx([0.9, 0.8])
    assert p.value_clip == pytest.approx([0.95, 0.95])
    assert p.group_heads == 2 and p.mode == "post_rope" and not p.rotate_values
    # Defaults: pre_rope, one head per group, values rotated, identity permutations.
    q = RotationPlan(1, 4, 64)
    assert q.mode == "pre_rope" and q.group_heads == 1 and q.rotate_values
    assert q == RotationPlan.hadamard(1, 4, 64, mode="pre_rope", group_heads=1)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"mode": "sideways"}, rotatekv.ArgumentError, "mode"),
        ({"group_heads": 3}, rotatekv.ArgumentError, "group_heads"),
        ({"group_heads": 0}, rotatekv.ArgumentError, "group_heads"),
        ({"key_perm": np.zeros((2, 100), np.int64)}, rotatekv.ShapeError, "key_perm"),
        ({"key_perm": np.zeros((2, 256), np.int64)}, rotatekv.ArgumentError, "key_perm[0]"),
        ({"key_perm": -np.ones((2, 256), np.int64)}, rotatekv.ArgumentError, "key_perm"),
        ({"key_perm": np.full((2, 256), 0.5)}, rotatekv.DTypeError, "key_perm"),
        ({"key_clip": [1.0]}, rotatekv.ShapeError, "key_clip"),
        ({"key_clip": 1.5}, rotatekv.ArgumentError, "key_clip"),
        ({"value_clip": [0.5, 0.0]}, rotatekv.ArgumentError, "value_clip"),
        ({"value_clip": "abc"}, rotatekv.DTypeError, "value_clip"),
    ],
)
def test_plan_constructor_validation(kwargs, exc, name):
    with pytest.raises(exc) as e:
        RotationPlan(2, 4, 64, **kwargs)
    assert name in str(e.value)
    assert isinstance(e.value, rotatekv.RotateKVError)
    assert isinstance(e.value, TypeError if exc is rotatekv.DTypeError else ValueError)


def test_plan_key_perm_repeated_entry_names_layer_and_group():
    perm = np.tile(np.arange(128) % 64, (2, 1))
    perm[1, 64 + 5] = 4
    with pytest.raises(rotatekv.ArgumentError, match=r"key_perm\[1\] group 1"):
        RotationPlan(2, 2, 64, key_perm=perm)


@pytest.mark.parametrize(
    "call,name",
    [
        (lambda: RotationPlan.identity(1, 2, 60), "head_dim"),
        (lambda: RotationPlan.identity(0, 2, 64), "num_layers"),
        (lambda: RotationPlan.identity(1, 0, 64), "num_kv_heads"),
        (lambda: RotationPlan.hadamard(1, 8, 128, mode="pre_rope", group_heads=3), "group_heads"),
        (lambda: RotationPlan.hadamard(1, 9, 64, mode="pre_rope", group_heads=9), "group_heads"),
        (lambda: RotationPlan.hadamard(1, 1, 72, mode="post_rope"), "group_heads"),
        (lambda: RotationPlan.hadamard(1, 1, 72, mode="none"), "rotate_values"),
        (lambda: RotationPlan.hadamard(1, 1, 64, mode="rope"), "mode"),
    ],
)
def test_plan_factories_validate(call, name):
    with pytest.raises(rotatekv.ArgumentError) as e:
        call()
    assert name in str(e.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda: RotationPlan.identity(-1, 2, 64),
        lambda: RotationPlan.hadamard(1, -2, 64),
        lambda: RotationPlan(1, 2, -64),
    ],
    ids=["identity", "hadamard", "constructor"],
)
def test_plan_negative_dimensions_raise_argument_errors(call):
    with pytest.raises(rotatekv.ArgumentError):
        call()


# ============================================================================================
# Plan files
# ============================================================================================


def calibrated_plan(gen: torch.Generator) -> RotationPlan:
    perm = np.stack(
        [
            np.concatenate([torch.randperm(128, generator=gen).numpy() for _ in range(2)])
            for _ in range(3)
        ]
    )
    return RotationPlan(
        3,
        4,
        64,
        mode="pre_rope",
        group_heads=2,
        key_perm=perm,
        key_clip=[0.9, 0.85, 1.0],
        value_clip=[1.0, 0.95, 0.9],
    )


def test_plan_save_load_round_trip(gen, tmp_path):
    p = calibrated_plan(gen)
    path = tmp_path / "plan.safetensors"
    p.save(path, metadata={"model": "tiny-llama", "calibration": "wikitext"})
    q = RotationPlan.load(path)
    assert q == p
    np.testing.assert_array_equal(q.key_perm, p.key_perm)
    assert q.key_clip == p.key_clip and q.value_clip == p.value_clip
    r, meta = RotationPlan.load_with_metadata(str(path), num_layers=3, num_kv_heads=4, head_dim=64)
    assert r == p
    assert meta["model"] == "tiny-llama" and meta["calibration"] == "wikitext"
    assert meta["format"] == "rotatekv.plan" and meta["format_version"] == "2"
    assert meta["mode"] == "pre_rope" and meta["group_heads"] == "2"
    # The file is plain safetensors with the documented tensors.
    with safe_open(str(path), "np") as f:
        assert sorted(f.keys()) == ["key_clip", "key_perm", "value_clip"]
        np.testing.assert_array_equal(f.get_tensor("key_perm"), p.key_perm)
        assert f.get_tensor("key_perm").dtype == np.int32
        assert f.get_tensor("key_clip").dtype == np.float32
    # A loaded plan drives a store exactly like the original.
    k, v = make_kv(gen, 1, 4, 20, 64)
    inv = 1.0 / (10000 ** (np.arange(0, 64, 2) / 64))
    outs = []
    for plan in (p, q):
        s = KVStore(3, 4, 64, config=QuantConfig(bits=2), plan=plan, rope_inv_freq=inv)
        s.append(2, k, v)
        outs.append(s.dequantize(2, 0)[1])
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize(
    "dims", [{"num_layers": 2}, {"num_kv_heads": 8}, {"head_dim": 128}, {"num_layers": 4}]
)
def test_plan_load_rejects_other_dimensions(gen, tmp_path, dims):
    path = tmp_path / "plan.safetensors"
    calibrated_plan(gen).save(str(path))
    for load in (RotationPlan.load, RotationPlan.load_with_metadata):
        with pytest.raises(rotatekv.FormatError) as e:
            load(str(path), **dims)
        name = next(iter(dims))
        assert name in str(e.value) and "plan.safetensors" in str(e.value)
        assert isinstance(e.value, ValueError)


def rewrite_plan(src, dst, meta_changes=None, tensor_changes=None) -> None:
    with safe_open(str(src), "np") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(meta_changes or {})
    for k, v in (tensor_changes or {}).items():
        if v is None:
            del tensors[k]
        else:
            tensors[k] = v
    meta = {k: v for k, v in meta.items() if v is not None}
    if (meta_changes or {}).get("checksum", "") is not None:
        meta["checksum"] = plan_checksum(meta, tensors)
    save_file(tensors, str(dst), metadata=meta)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def plan_checksum(meta: dict, tensors: dict) -> str:
    """The documented plan checksum, recomputed so crafted files reach the field checks."""
    buf = b"".join(
        k.encode() + b"\0" + meta[k].encode() + b"\0" for k in sorted(meta) if k != "checksum"
    )
    for name in ("key_perm", "key_clip", "value_clip"):
        if name in tensors:
            buf += np.ascontiguousarray(tensors[name]).tobytes()
    return f"{fnv1a64(buf):016x}"


@pytest.mark.parametrize(
    "meta,tensors",
    [
        ({"format": "rotatekv.store"}, None),
        ({"format": None}, None),
        ({"format_version": "3"}, None),
        ({"mode": "diagonal"}, None),
        ({"num_layers": "many"}, None),
        ({"num_layers": "2"}, None),
        ({"group_heads": "3"}, None),
        ({"rotate_values": "yes"}, None),
        (None, {"key_perm": None}),
        (None, {"key_clip": np.array([0.9, 0.8, 1.5], np.float32)}),
        (None, {"key_perm": np.zeros((3, 256), np.int32)}),
        (None, {"key_perm": np.zeros((3, 256), np.int64)}),
        (None, {"value_clip": np.ones(3, np.float64)}),
    ],
)
def test_plan_load_rejects_inconsistent_files(gen, tmp_path, meta, tensors):
    good = tmp_path / "good.safetensors"
    bad = tmp_path / "bad.safetensors"
    calibrated_plan(gen).save(good)
    rewrite_plan(good, bad, meta, tensors)
    with pytest.raises(rotatekv.FormatError) as e:
        RotationPlan.load(bad)
    assert "bad.safetensors" in str(e.value)
    # Sanity: the unchanged rewrite loads.
    rewrite_plan(good, bad)
    assert RotationPlan.load(bad) == RotationPlan.load(good)


def test_every_flipped_byte_of_a_plan_is_caught(gen, tmp_path):
    path = tmp_path / "plan.safetensors"
    calibrated_plan(gen).save(path, metadata={"note": "calibrated on wikitext"})
    data = path.read_bytes()
    # Every byte of the header (metadata included) and a spread of tensor bytes.
    hlen = 8 + int.from_bytes(data[:8], "little")
    where = list(range(8, hlen)) + list(range(hlen, len(data), 7))
    for i in where:
        bad = bytearray(data)
        bad[i] ^= 0x10
        path.write_bytes(bytes(bad))
        try:
            RotationPlan.load(path)
        except rotatekv.FormatError:
            continue
        # Flips that keep the file meaning the same (JSON whitespace is not there to flip).
        pytest.fail(f"flip at byte {i} of {len(data)} loaded")


def test_version_1_plans_without_checksum_still_load(gen, tmp_path):
    good = tmp_path / "good.safetensors"
    old = tmp_path / "old.safetensors"
    calibrated_plan(gen).save(good)
    rewrite_plan(good, old, {"format_version": "1", "checksum": None})
    assert RotationPlan.load(old) == RotationPlan.load(good)
    rewrite_plan(good, old, {"checksum": None})
    with pytest.raises(rotatekv.FormatError, match="checksum"):
        RotationPlan.load(old)


def test_plan_load_rejects_damaged_and_missing_files(gen, tmp_path):
    path = tmp_path / "plan.safetensors"
    calibrated_plan(gen).save(path)
    data = path.read_bytes()
    for damaged in (data[: len(data) - 5], data[:7], b"garbage", b""):
        path.write_bytes(damaged)
        with pytest.raises(rotatekv.FormatError):
            RotationPlan.load(path)
    with pytest.raises(rotatekv.StoreIOError) as e:
        RotationPlan.load(tmp_path / "missing.safetensors")
    assert isinstance(e.value, OSError) and "missing.safetensors" in str(e.value)
    with pytest.raises(rotatekv.StoreIOError):
        calibrated_plan(gen).save(tmp_path / "no-such-dir" / "plan.safetensors")
