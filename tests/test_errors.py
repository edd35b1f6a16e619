"""Every bad input raises a rotatekv.RotateKVError subclass that names the argument (shape and
value problems are also ValueError, type problems TypeError), and leaves the store as it was.
Damaged files raise FormatError, missing ones StoreIOError; nothing ever panics."""

from __future__ import annotations

import json
import struct
import types

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from reference import assert_same_snapshot, default_inv_freq, make_kv, snapshot
from rotatekv import (
    ArgumentError,
    CapacityError,
    DeviceError,
    DTypeError,
    FormatError,
    KVStore,
    QuantConfig,
    RotateKVError,
    RotationPlan,
    ShapeError,
    StoreIOError,
)

B, H, T, D = 2, 2, 5, 64


def test_exception_hierarchy():
    for cls, builtin in [
        (ShapeError, ValueError),
        (ArgumentError, ValueError),
        (DTypeError, TypeError),
        (FormatError, ValueError),
        (StoreIOError, OSError),
        (DeviceError, RuntimeError),
        (CapacityError, MemoryError),
    ]:
        assert issubclass(cls, RotateKVError) and issubclass(cls, builtin)
        assert cls.__module__ == "rotatekv"
    assert issubclass(RotateKVError, Exception)
    assert not issubclass(DTypeError, ValueError)


@pytest.fixture
def store() -> KVStore:
    """A populated store: 2 layers, 2 sequences, a recent window, protected tokens."""
    gen = torch.Generator().manual_seed(1)
    s = KVStore(
        2,
        H,
        D,
        batch_size=B,
        config=QuantConfig(bits=2, residual=4),
        plan=RotationPlan.hadamard(2, H, D, mode="pre_rope"),
        rope_inv_freq=default_inv_freq(D),
    )
    k, v = make_kv(gen, B, H, 40, D)
    prot = torch.zeros(B, 40, dtype=torch.bool)
    prot[:, 0] = True
    s.append(0, k, v, protect=prot)
    s.append(1, k[:, :, :7], v[:, :, :7])
    return s


PROBE = torch.randn(B, 2 * H, 2, D, generator=torch.Generator().manual_seed(2))


def check_error(store: KVStore, call, exc: type, *names: str) -> RotateKVError:
    before = snapshot(store, PROBE)
    with pytest.raises(exc) as info:
        call()
    err = info.value
    assert isinstance(err, RotateKVError)
    if exc in (ShapeError, ArgumentError, FormatError):
        assert isinstance(err, ValueError)
    if exc is DTypeError:
        assert isinstance(err, TypeError)
    for name in names:
        assert name in str(err), f"{name!r} not in {str(err)!r}"
    assert_same_snapshot(before, snapshot(store, PROBE))
    return err


def kv(t: int = T, **over: int) -> torch.Tensor:
    shape = {"b": B, "h": H, "t": t, "d": D}
    shape.update(over)
    return torch.randn(shape["b"], shape["h"], shape["t"], shape["d"])


def nan_at_end() -> torch.Tensor:
    x = kv()
    x[-1, -1, -1, -1] = float("nan")
    return x


def inf_at_start() -> torch.Tensor:
    x = kv()
    x[0, 0, 0, 0] = float("inf")
    return x


def unaligned() -> np.ndarray:
    raw = np.zeros(B * H * T * D * 4 + 1, np.uint8)
    return np.frombuffer(raw.data, np.float32, count=B * H * T * D, offset=1).reshape(B, H, T, D)


APPEND_CASES = {
    # name: (kwargs factory, exception, names in the message)
    "layer negative": (lambda: {"layer": -1}, ArgumentError, ["layer"]),
    "layer too big": (lambda: {"layer": 2}, ArgumentError, ["layer"]),
    "k 3-d": (lambda: {"k": kv()[0]}, ShapeError, ["k"]),
    "k 5-d": (lambda: {"k": kv()[None]}, ShapeError, ["k"]),
    "k 0-d": (lambda: {"k": torch.tensor(1.0)}, ShapeError, ["k"]),
    "k batch": (lambda: {"k": kv(b=3), "v": kv(b=3)}, ShapeError, ["k", "B=2"]),
    "k heads": (lambda: {"k": kv(h=4)}, ShapeError, ["k", "Hkv=2"]),
    "k head_dim": (lambda: {"k": kv(d=32)}, ShapeError, ["k", "D=64"]),
    "v tokens differ": (lambda: {"v": kv(t=T + 1)}, ShapeError, ["v"]),
    "v head_dim": (lambda: {"v": kv(d=128)}, ShapeError, ["v"]),
    "k int32": (lambda: {"k": kv().to(torch.int32)}, DTypeError, ["k", "int32"]),
    "k float64": (lambda: {"k": kv().double()}, DTypeError, ["k", "float64"]),
    "k bool": (lambda: {"k": kv() > 0}, DTypeError, ["k"]),
    "k complex": (lambda: {"k": kv().to(torch.complex64)}, DTypeError, ["k"]),
    "v numpy float64": (lambda: {"v": kv().double().numpy()}, DTypeError, ["v", "float64"]),
    "v numpy int": (lambda: {"v": kv().numpy().astype(np.int16)}, DTypeError, ["v"]),
    "k list": (lambda: {"k": kv().tolist()}, DTypeError, ["k", "list"]),
    "k None": (lambda: {"k": None}, DTypeError, ["k"]),
    "k str": (lambda: {"k": "keys"}, DTypeError, ["k"]),
    "k meta device": (lambda: {"k": kv().to("meta")}, DeviceError, ["k", "meta"]),
    "k negative strides": (lambda: {"k": kv().numpy()[..., ::-1]}, ShapeError, ["k", "strides"]),
    "k unaligned": (lambda: {"k": unaligned()}, ArgumentError, ["k", "aligned"]),
    "k nan in last token": (lambda: {"k": nan_at_end()}, ArgumentError, ["k", "finite"]),
    "v inf": (lambda: {"v": inf_at_start()}, ArgumentError, ["v", "finite"]),
    "positions shape": (lambda: {"positions": np.arange(3)}, ShapeError, ["positions"]),
    "positions 2-d shape": (
        lambda: {"positions": np.zeros((B, T + 1), np.int64)},
        ShapeError,
        ["positions"],
    ),
    "positions [1, T]": (lambda: {"positions": np.zeros((1, T), np.int64)}, ShapeError, []),
    "positions negative": (lambda: {"positions": [0, 1, -2, 3, 4]}, ArgumentError, ["positions"]),
    "positions too large": (
        lambda: {"positions": [0, 1, 2, 3, 2**31 - 1]},
        ArgumentError,
        ["positions"],
    ),
    "positions float": (
        lambda: {"positions": np.arange(T, dtype=np.float32)},
        DTypeError,
        ["positions"],
    ),
    "positions str": (lambda: {"positions": ["a"] * T}, DTypeError, ["positions"]),
    "positions ragged": (lambda: {"positions": [[1], [1, 2]]}, DTypeError, ["positions"]),
    "protect 1-d": (lambda: {"protect": np.zeros(T, bool)}, ShapeError, ["protect"]),
    "protect shape": (lambda: {"protect": np.zeros((B, T + 2), bool)}, ShapeError, ["protect"]),
    "protect int": (lambda: {"protect": np.zeros((B, T), np.int64)}, DTypeError, ["protect"]),
    "valid shape": (lambda: {"valid": np.ones((T, B), bool)}, ShapeError, ["valid"]),
    "valid float": (lambda: {"valid": torch.ones(B, T)}, DTypeError, ["valid"]),
    "bits shape": (lambda: {"bits": np.full((B, 1), 2)}, ShapeError, ["bits"]),
    "bits float": (lambda: {"bits": np.full((B, T), 2.0)}, DTypeError, ["bits"]),
    "bits bool": (lambda: {"bits": np.ones((B, T), bool)}, DTypeError, ["bits"]),
    "bits 5": (lambda: {"bits": np.full((B, T), 5)}, ArgumentError, ["bits", "5"]),
    "bits 1 somewhere": (
        lambda: {"bits": np.array([[2, 2, 2, 2, 2], [2, 2, 2, 2, 1]])},
        ArgumentError,
        ["bits"],
    ),
    "bits 0": (lambda: {"bits": torch.zeros(B, T, dtype=torch.int64)}, ArgumentError, ["bits"]),
}


@pytest.mark.parametrize("case", list(APPEND_CASES), ids=list(APPEND_CASES))
def test_bad_append_inputs(store, case):
    factory, exc, names = APPEND_CASES[case]
    kwargs = {"layer": 0, "k": kv(), "v": kv()}
    kwargs.update(factory())
    check_error(store, lambda: store.append(**kwargs), exc, *names)
    # The same call with the bad argument fixed succeeds (the error was about that argument).
    store.append(0, kv(), kv())
    assert store.seq_lens(0) == [45, 45]


def test_nan_in_padded_slots_is_accepted(store):
    k = kv()
    k[0, :, :2] = float("nan")
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :2] = False
    store.append(0, k, kv(), valid=valid)
    assert store.seq_lens(0) == [43, 45]
    assert np.isfinite(store.dequantize(0, 0)[1]).all()


def test_default_positions_overflow_is_rejected(store):
    store.append(0, kv(t=1), kv(t=1), positions=[2**31 - 2])
    check_error(store, lambda: store.append(0, kv(t=2), kv(t=2)), ArgumentError, "positions")


def test_default_positions_overflow_is_rejected_on_every_layer(store):
    store.append(1, kv(t=1), kv(t=1), positions=[2**31 - 2])
    check_error(store, lambda: store.append(1, kv(t=2), kv(t=2)), ArgumentError, "positions")


def q_(hq: int = 2 * H, tq: int = 1, d: int = D, b: int = B) -> torch.Tensor:
    return torch.randn(b, hq, tq, d)


def q_nan() -> torch.Tensor:
    q = q_()
    q[1, 3, 0, 7] = float("nan")
    return q


ATTEND_CASES = {
    "layer negative": ({"layer": -1}, ArgumentError, ["layer"]),
    "layer too big": ({"layer": 2}, ArgumentError, ["layer"]),
    "q heads not a multiple": ({"q": q_(hq=3)}, ShapeError, ["q", "multiple of 2"]),
    "q no heads": ({"q": q_(hq=0)}, ShapeError, ["q"]),
    "q head_dim": ({"q": q_(d=128)}, ShapeError, ["q", "D=64"]),
    "q batch": ({"q": q_(b=1)}, ShapeError, ["q", "B=2"]),
    "q 3-d": ({"q": q_()[0]}, ShapeError, ["q"]),
    "q int": ({"q": q_().to(torch.int64)}, DTypeError, ["q"]),
    "q float64": ({"q": q_().double()}, DTypeError, ["q", "float64"]),
    "q numpy float64": ({"q": q_().double().numpy()}, DTypeError, ["q"]),
    "q list": ({"q": [[1.0]]}, DTypeError, ["q"]),
    "q nan": ({"q": q_nan()}, ArgumentError, ["q", "finite"]),
    "q meta": ({"q": q_().to("meta")}, DeviceError, ["q"]),
    "positions shape": ({"positions": [[1, 2]]}, ShapeError, ["positions"]),
    "positions negative": ({"positions": [-1]}, ArgumentError, ["positions"]),
    "positions float": ({"positions": [1.5]}, DTypeError, ["positions"]),
    "window 0": ({"window": 0}, ArgumentError, ["window"]),
    "window negative": ({"window": -3}, ArgumentError, ["window"]),
    "scale 0": ({"scale": 0.0}, ArgumentError, ["scale"]),
    "scale negative": ({"scale": -0.1}, ArgumentError, ["scale"]),
    "scale nan": ({"scale": float("nan")}, ArgumentError, ["scale"]),
    "scale inf": ({"scale": float("inf")}, ArgumentError, ["scale"]),
    "scale underflow": ({"scale": 1e-300}, ArgumentError, ["scale"]),
    "softcap 0": ({"softcap": 0.0}, ArgumentError, ["softcap"]),
    "softcap negative": ({"softcap": -30.0}, ArgumentError, ["softcap"]),
    "softcap nan": ({"softcap": float("nan")}, ArgumentError, ["softcap"]),
    "softcap inf": ({"softcap": float("inf")}, ArgumentError, ["softcap"]),
}


@pytest.mark.parametrize("case", list(ATTEND_CASES), ids=list(ATTEND_CASES))
def test_bad_attend_inputs(store, case):
    over, exc, names = ATTEND_CASES[case]
    kwargs = {"layer": 0, "q": q_()}
    kwargs.update(over)
    check_error(store, lambda: store.attend(**kwargs), exc, *names)


def test_bad_arguments_of_other_methods(store):
    check_error(store, lambda: store.seq_lens(2), ArgumentError, "layer")
    check_error(store, lambda: store.seq_lens(-1), ArgumentError, "layer")
    check_error(store, lambda: store.dequantize(0, 2), ArgumentError, "seq")
    check_error(store, lambda: store.dequantize(0, -1), ArgumentError, "seq")
    check_error(store, lambda: store.dequantize(5, 0), ArgumentError, "layer")
    check_error(store, lambda: store.page_buffers(0, 9), ArgumentError, "seq")
    check_error(store, lambda: store.reorder([0]), ShapeError, "indices")
    check_error(store, lambda: store.reorder([0, 2]), ArgumentError, "indices")
    check_error(store, lambda: store.reorder([-1, 0]), ArgumentError, "indices")
    check_error(store, lambda: store.reorder([[0, 1]]), ShapeError, "indices")
    check_error(store, lambda: store.reorder([0.0, 1.0]), DTypeError, "indices")
    check_error(store, lambda: store.truncate(-1), ArgumentError, "length")
    check_error(store, lambda: store.truncate([3, 4, 5]), ShapeError, "length")
    check_error(store, lambda: store.truncate([3, -4]), ArgumentError, "length")
    check_error(store, lambda: store.truncate(1.5), DTypeError, "length")


# ============================================================================================
# Construction
# ============================================================================================


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"bits": 5}, "bits"),
        ({"bits": 1}, "bits"),
        ({"key_layout": "x"}, "key_layout"),
        ({"residual": -1}, "residual"),
        ({"key_clip": 1.5}, "key_clip"),
        ({"value_clip": 0.0}, "value_clip"),
        ({"value_clip": -0.5}, "value_clip"),
    ],
)
def test_bad_quant_config(kwargs, name):
    with pytest.raises(ArgumentError, match=name) as e:
        QuantConfig(**kwargs)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "config,name",
    [
        (QuantConfig(group_size=48), "group_size"),
        (QuantConfig(group_size=12), "group_size"),
        (QuantConfig(group_size=128), "group_size"),
        (QuantConfig(page_tokens=48), "page_tokens"),
        (QuantConfig(page_tokens=16), "page_tokens"),
        (QuantConfig(page_tokens=-1), "page_tokens"),
        # Objects that skip QuantConfig's own checks are checked by the store.
        (types.SimpleNamespace(bits=5), "bits"),
        (types.SimpleNamespace(bits="2"), "bits"),
        (types.SimpleNamespace(group_size=0), "group_size"),
        (types.SimpleNamespace(group_size="all"), "group_size"),
        (types.SimpleNamespace(key_layout="x"), "key_layout"),
        (types.SimpleNamespace(key_layout=3), "key_layout"),
        (types.SimpleNamespace(residual=-1), "residual"),
        (types.SimpleNamespace(key_clip=1.5), "key_clip"),
        (types.SimpleNamespace(value_clip=float("nan")), "value_clip"),
        (types.SimpleNamespace(fp_format="float32"), "fp_format"),
        (types.SimpleNamespace(page_tokens="many"), "page_tokens"),
    ],
)
def test_bad_store_config(config, name):
    with pytest.raises(ArgumentError, match=name):
        KVStore(1, 2, 64, config=config)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        ({"num_layers": 0}, ArgumentError, "num_layers"),
        ({"num_kv_heads": -1}, ArgumentError, "num_kv_heads"),
        ({"head_dim": 60}, ArgumentError, "head_dim"),
        ({"head_dim": 0}, ArgumentError, "head_dim"),
        ({"batch_size": 0}, ArgumentError, "batch_size"),
        ({"plan": RotationPlan.identity(1, 2, 128)}, ArgumentError, "plan"),
        ({"plan": RotationPlan.identity(2, 2, 64)}, ArgumentError, "plan"),
        ({"plan": "hadamard"}, DTypeError, "plan"),
        (
            {"plan": RotationPlan.hadamard(1, 2, 64, mode="pre_rope")},
            ArgumentError,
            "rope_inv_freq",
        ),
        ({"rope_inv_freq": np.ones(33, np.float32)}, ShapeError, "rope_inv_freq"),
        ({"rope_inv_freq": []}, ShapeError, "rope_inv_freq"),
        ({"rope_inv_freq": [1.0, float("inf")]}, ArgumentError, "rope_inv_freq"),
        ({"rope_inv_freq": "abc"}, DTypeError, "rope_inv_freq"),
        ({"rope_inv_freq": [1.0], "rope_scaling": 0.0}, ArgumentError, "rope_scaling"),
        ({"rope_inv_freq": [1.0], "rope_scaling": float("nan")}, ArgumentError, "rope_scaling"),
        ({"device": "cuda"}, DeviceError, "device"),
        ({"device": "cuda:0"}, DeviceError, "device"),
    ],
)
def test_bad_store_arguments(kwargs, exc, name):
    args = {"num_layers": 1, "num_kv_heads": 2, "head_dim": 64}
    args.update(kwargs)
    with pytest.raises(exc, match=name) as e:
        KVStore(**args)
    assert isinstance(e.value, RotateKVError)
    if exc is DeviceError:
        assert isinstance(e.value, RuntimeError)


def test_config_dict_is_not_silently_ignored():
    try:
        store = KVStore(1, 2, 64, config={"bits": 4, "group_size": 32})
    except RotateKVError:
        return
    assert store.config["bits"] == 4 and store.config["group_size"] == 32


# ============================================================================================
# Inputs that escape the checks (suspected bugs)
# ============================================================================================


@pytest.mark.parametrize("kind", ["sparse", "conj"])
def test_tensors_that_cannot_be_exported_raise_rotatekv_errors(store, kind):
    k = kv()
    bad = k.to_sparse() if kind == "sparse" else k.to(torch.complex64).conj()
    check_error(store, lambda: store.append(0, bad, kv()), RotateKVError, "k")


@pytest.mark.parametrize("arg", ["protect", "valid"])
def test_ragged_masks_raise_rotatekv_errors(store, arg):
    ragged = [[True] * T, [True] * (T - 1)]
    check_error(store, lambda: store.append(0, kv(), kv(), **{arg: ragged}), RotateKVError, arg)


def test_values_beyond_float16_range_do_not_become_inf():
    store = KVStore(1, 1, 64, config=QuantConfig(bits=16))
    k = torch.full((1, 1, 2, 64), 1e5)
    try:
        store.append(0, k, k)
    except ArgumentError:
        return
    assert np.isfinite(store.dequantize(0, 0)[1]).all()


# ============================================================================================
# Files
# ============================================================================================


def saved(store: KVStore, tmp_path) -> bytes:
    path = tmp_path / "store.safetensors"
    store.save(path)
    return path.read_bytes()


def header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def check_load_fails(tmp_path, data: bytes, exc: type = FormatError) -> None:
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(data)
    with pytest.raises(exc) as e:
        KVStore.load(path)
    assert "damaged.safetensors" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_truncated_files(store, tmp_path):
    data = saved(store, tmp_path)
    for n in (len(data) - 1, len(data) - 100, len(data) // 2, header_len(data), 9, 8, 3, 0):
        check_load_fails(tmp_path, data[:n])


def test_one_flipped_byte_in_the_data(store, tmp_path):
    data = saved(store, tmp_path)
    start = header_len(data)
    positions = [(start + len(data)) // 2] + list(range(start, len(data), len(data) // 37))
    for at in positions:
        damaged = bytearray(data)
        damaged[at] ^= 0x10
        check_load_fails(tmp_path, bytes(damaged))


def test_garbage_files(tmp_path):
    rng = np.random.default_rng(0)
    for data in (b"garbage", rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), b"\0" * 64):
        check_load_fails(tmp_path, data)


def rewrite_store(src, dst, meta=None, tensors=None) -> None:
    with safe_open(str(src), "np") as f:
        m = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in (meta or {}).items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v(m[k]) if callable(v) else v
    for k, v in (tensors or {}).items():
        if v is None:
            ts.pop(k)
        else:
            ts[k] = v(ts[k]) if callable(v) else v
    save_file(ts, str(dst), metadata=m)


def edit_header(fn):
    def edit(s: str) -> str:
        h = json.loads(s)
        fn(h)
        return json.dumps(h)

    return edit


def _set(**kv_):
    def f(h: dict) -> None:
        h.update(kv_)

    return f


def _first_page(field: int, value: object):
    def f(h: dict) -> None:
        h["seqs"][0]["pages"][0][field] = value

    return f


@pytest.mark.parametrize(
    "meta,tensors",
    [
        ({"format": "rotatekv.plan"}, None),
        ({"format": None}, None),
        ({"format_version": "2"}, None),
        ({"checksums": None}, None),
        ({"checksums": "not json"}, None),
        ({"store": None}, None),
        ({"store": "{"}, None),
        ({"store": edit_header(_set(bits=5))}, None),
        ({"store": edit_header(_set(key_layout="diagonal"))}, None),
        ({"store": edit_header(_set(fp_format="float8"))}, None),
        ({"store": edit_header(_set(page_tokens=48))}, None),
        ({"store": edit_header(_set(heads=3))}, None),
        ({"store": edit_header(_set(num_layers=3))}, None),
        ({"store": edit_header(_set(group_size=48))}, None),
        ({"store": edit_header(_set(seqs=[]))}, None),
        ({"store": edit_header(_first_page(1, 4))}, None),
        ({"store": edit_header(_first_page(3, 65))}, None),
        ({"store": edit_header(_first_page(2, 50))}, None),
        ({"store": edit_header(_first_page(0, 999))}, None),
        ({"store": edit_header(_first_page(5, "yes"))}, None),
        (None, {"page.0": None}),
        (None, {"plan.key_perm": None}),
        (None, {"page.1": lambda x: x[:-8]}),
        (None, {"page.1": lambda x: x ^ 1}),
        (None, {"plan.key_clip": lambda x: x * 2}),
        (None, {"rope.inv_freq": None}),
    ],
)
def test_inconsistent_files(store, tmp_path, meta, tensors):
    good = tmp_path / "good.safetensors"
    store.save(good)
    bad = tmp_path / "damaged.safetensors"
    rewrite_store(good, bad, meta, tensors)
    with pytest.raises(FormatError, match="damaged.safetensors"):
        KVStore.load(bad)
    # Sanity: the same rewrite without changes loads the same store.
    rewrite_store(good, bad)
    assert_same_snapshot(snapshot(KVStore.load(bad), PROBE), snapshot(store, PROBE))


def test_files_of_the_other_kind(store, tmp_path):
    plan_path = tmp_path / "plan.safetensors"
    store.plan.save(plan_path)
    with pytest.raises(FormatError, match="rotatekv store"):
        KVStore.load(plan_path)
    store_path = tmp_path / "store.safetensors"
    store.save(store_path)
    with pytest.raises(FormatError, match="rotatekv plan"):
        RotationPlan.load(store_path)


def test_missing_files_and_unwritable_paths(store, tmp_path):
    with pytest.raises(StoreIOError, match="missing") as e:
        KVStore.load(tmp_path / "missing.safetensors")
    assert isinstance(e.value, OSError)
    with pytest.raises(StoreIOError):
        KVStore.load(tmp_path)  # a directory
    before = snapshot(store, PROBE)
    with pytest.raises(StoreIOError):
        store.save(tmp_path / "no-such-dir" / "store.safetensors")
    with pytest.raises(StoreIOError):
        store.save(tmp_path)
    assert_same_snapshot(before, snapshot(store, PROBE))
    # A failed save leaves no temporary files behind.
    assert list(tmp_path.iterdir()) == []


def test_flipped_digit_in_the_header(store, tmp_path):
    data = saved(store, tmp_path)
    header = data[8 : header_len(data)].decode()
    inner = json.loads(json.loads(header)["__metadata__"]["store"])
    entry = inner["seqs"][1]["pages"][0]  # layer 0, sequence 1: the protected token's page
    assert entry[1] == 16 and entry[3] == 1
    old = json.dumps(entry, separators=(",", ":"))
    new = json.dumps(entry[:3] + [2] + entry[4:], separators=(",", ":"))
    at = data.index(old.encode())
    assert len(new) == len(old) and old != new
    damaged = data[:at] + new.encode() + data[at + len(old) :]
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damaged)
    try:
        loaded = KVStore.load(path)
    except FormatError:
        return
    assert_same_snapshot(snapshot(loaded, PROBE), snapshot(store, PROBE))


# ============================================================================================
# Fuzzing: only rotatekv errors, never a panic
# ============================================================================================

TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.int8,
    torch.bool,
    torch.complex64,
]
NUMPY_DTYPES = [np.float32, np.float16, np.float64, np.int32, np.uint8, np.bool_, np.complex64]


@st.composite
def tensor_likes(draw: st.DrawFn, shape: tuple[int, ...]) -> object:
    """Mostly tensors near the wanted shape, of any dtype and layout, sometimes not tensors."""
    kind = draw(st.sampled_from(["torch", "torch", "torch", "numpy", "numpy", "other"]))
    if kind == "other":
        return draw(
            st.sampled_from([None, 1.5, "k", [1.0, 2.0], [[[[0.0]]]], b"abc", object(), {}])
        )
    shp = list(shape)
    mutation = draw(st.sampled_from(["none", "none", "dim", "drop", "add", "zero"]))
    if mutation == "dim":
        shp[draw(st.integers(0, len(shp) - 1))] = draw(st.integers(0, 7))
    elif mutation == "drop":
        shp.pop(draw(st.integers(0, len(shp) - 1)))
    elif mutation == "add":
        shp.insert(draw(st.integers(0, len(shp))), draw(st.integers(1, 3)))
    elif mutation == "zero":
        shp[draw(st.integers(0, len(shp) - 1))] = 0
    special = draw(st.sampled_from(["normal"] * 6 + ["nan", "inf", "huge"]))
    x = torch.randn(*shp) if shp else torch.randn(())
    if special == "nan" and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = float("nan")
    elif special == "inf" and x.numel():
        x.view(-1)[0] = float("-inf")
    elif special == "huge":
        x = x * 1e30
    layout = draw(st.sampled_from(["contiguous", "contiguous", "transposed", "expanded"]))
    if kind == "torch":
        t = x.to(draw(st.sampled_from(TORCH_DTYPES)))
        if layout == "transposed" and t.dim() >= 2:
            t = t.transpose(0, -1).contiguous().transpose(0, -1)
        elif layout == "expanded" and t.dim() >= 1 and t.shape[0] > 0:
            t = t[:1].expand(t.shape)
        if draw(st.booleans()) and t.is_floating_point():
            t = t.requires_grad_()
        return t
    with np.errstate(invalid="ignore", over="ignore"):
        a = x.numpy().astype(draw(st.sampled_from(NUMPY_DTYPES)))
    if layout == "transposed" and a.ndim >= 2:
        a = np.ascontiguousarray(a.swapaxes(0, -1)).swapaxes(0, -1)
    elif layout == "expanded" and a.ndim >= 1 and a.shape[0] > 0:
        a = np.broadcast_to(a[:1], a.shape)
    elif draw(st.booleans()) and a.ndim >= 1:
        a = a[..., ::-1]
    return a


@st.composite
def int_likes(draw: st.DrawFn, shape: tuple[int, ...], lo: int, hi: int) -> object:
    kind = draw(st.sampled_from(["none", "good", "good", "shape", "dtype", "value", "other"]))
    if kind == "none":
        return None
    shp = shape if kind != "shape" else (draw(st.integers(0, 4)),) * draw(st.integers(0, 3))
    a = np.asarray(draw(st.lists(st.integers(lo, hi), min_size=1, max_size=1)) * int(np.prod(shp)))
    a = a.reshape(shp) if a.size == int(np.prod(shp)) else np.zeros(shp, np.int64)
    if kind == "dtype":
        return a.astype(draw(st.sampled_from([np.float32, np.bool_, np.complex64, object])))
    if kind == "value":
        return a * 0 + draw(st.sampled_from([-1, 2**31 - 1, 2**40, 5, 1, 0]))
    if kind == "other":
        return draw(st.sampled_from(["x", 1.5, [None], object()]))
    return torch.from_numpy(a) if draw(st.booleans()) else a


@st.composite
def bool_likes(draw: st.DrawFn, shape: tuple[int, ...]) -> object:
    kind = draw(st.sampled_from(["none", "good", "good", "shape", "dtype", "other"]))
    if kind == "none":
        return None
    shp = shape if kind != "shape" else (draw(st.integers(0, 4)),) * draw(st.integers(0, 3))
    n = int(np.prod(shp))
    a = np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool).reshape(shp)
    if kind == "dtype":
        return a.astype(draw(st.sampled_from([np.int64, np.float32, np.uint8])))
    if kind == "other":
        return draw(st.sampled_from(["x", 1.5, object(), True]))
    return torch.from_numpy(a) if draw(st.booleans()) else a


def run_only_rotatekv_errors(store: KVStore, call) -> None:
    before = snapshot(store)
    try:
        call()
    except BaseException as e:  # noqa: BLE001 - PanicException derives from BaseException
        if not isinstance(e, RotateKVError):
            raise AssertionError(f"{type(e).__module__}.{type(e).__name__}: {e}") from e
        assert_same_snapshot(before, snapshot(store))


def fuzz_store(pre_rope: bool) -> KVStore:
    plan = RotationPlan.hadamard(2, H, D, mode="pre_rope" if pre_rope else "post_rope")
    cfg = QuantConfig(bits=2, residual=3, key_layout="per_channel" if pre_rope else "per_token")
    s = KVStore(2, H, D, batch_size=B, config=cfg, plan=plan, rope_inv_freq=default_inv_freq(D))
    s.append(0, torch.randn(B, H, 33, D), torch.randn(B, H, 33, D))
    return s


@given(data=st.data(), pre_rope=st.booleans())
def test_fuzz_append_raises_only_rotatekv_errors(data, pre_rope):
    store = fuzz_store(pre_rope)
    t = data.draw(st.integers(0, 6))
    kwargs = {
        "k": data.draw(tensor_likes((B, H, t, D))),
        "v": data.draw(tensor_likes((B, H, t, D))),
        "positions": data.draw(int_likes(data.draw(st.sampled_from([(B, t), (t,)])), 0, 100)),
        "protect": data.draw(bool_likes((B, t))),
        "valid": data.draw(bool_likes((B, t))),
        "bits": data.draw(int_likes((B, t), 2, 2)),
    }
    layer = data.draw(st.sampled_from([0, 1, 1, -1, 2]))
    kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("k", "v")}
    run_only_rotatekv_errors(store, lambda: store.append(layer, **kwargs))


@given(data=st.data(), pre_rope=st.booleans())
def test_fuzz_attend_raises_only_rotatekv_errors(data, pre_rope):
    store = fuzz_store(pre_rope)
    tq = data.draw(st.integers(0, 4))
    hq = data.draw(st.sampled_from([H, 2 * H, 8 * H, 3]))
    q = data.draw(tensor_likes((B, hq, tq, D)))
    positions = data.draw(int_likes(data.draw(st.sampled_from([(B, tq), (tq,)])), 0, 100))
    window = data.draw(st.sampled_from([None, None, 1, 0, -1, 2**62, 2**63 - 1]))
    scale = data.draw(st.sampled_from([None, None, 0.1, 0.0, -1.0, float("nan"), 1e300, 1e-300]))
    softcap = data.draw(st.sampled_from([None, None, 30.0, 0.0, float("inf"), 1e-45]))
    causal = data.draw(st.booleans())
    layer = data.draw(st.sampled_from([0, 1, 1, -1, 2]))

    def call() -> None:
        out = store.attend(
            layer,
            q,
            positions=positions,
            causal=causal,
            scale=scale,
            window=window,
            softcap=softcap,
        )
        assert tuple(out.shape) == tuple(q.shape)

    run_only_rotatekv_errors(store, call)


def run_limited(code: str) -> tuple[int, str]:
    """Runs ``code`` in a child interpreter whose address space is capped at 4 GiB, so that a
    runaway allocation fails fast instead of exhausting the machine."""
    import resource
    import subprocess
    import sys

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    res = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=cap,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return res.returncode, res.stdout + res.stderr


def test_limits_on_store_dimensions_are_checked():
    code = (
        "import rotatekv\n"
        "for kw in (dict(batch_size=2**20 + 1), dict(num_kv_heads=4097), dict(head_dim=4104)):\n"
        "    args = dict(num_layers=1, num_kv_heads=1, head_dim=8)\n"
        "    args.update(kw)\n"
        "    try:\n"
        "        rotatekv.KVStore(**args)\n"
        "    except rotatekv.ArgumentError as e:\n"
        "        print(next(iter(kw)) in str(e))\n"
    )
    rc, out = run_limited(code)
    assert rc == 0 and out.split() == ["True"] * 3, out


def test_too_many_layers_is_an_argument_error_not_an_abort():
    code = (
        "import rotatekv\n"
        "try:\n"
        "    rotatekv.KVStore(10**9, 2, 64)\n"
        "except rotatekv.ArgumentError as e:\n"
        "    print('num_layers' in str(e))\n"
    )
    rc, out = run_limited(code)
    assert rc == 0 and out.strip() == "True", out[-500:]
