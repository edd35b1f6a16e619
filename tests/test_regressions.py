"""Regressions found by review: each test reproduces a bug that existed."""

import json
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

import rotatekv
from rotatekv import KVStore, QuantConfig


def _fnv(b: bytes) -> str:
    h = 0xCBF29CE484222325
    for x in b:
        h = ((h ^ x) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def test_append_after_truncate_of_an_unordered_window_terminates():
    # A truncate left an emptied window page with room at the front; draining it looped.
    code = textwrap.dedent(
        """
        import torch
        from rotatekv import KVStore, QuantConfig
        s = KVStore(1, 1, 64, config=QuantConfig(bits=4, residual=128))
        pos = torch.arange(128); pos[0] = 1000
        s.append(0, torch.randn(1, 1, 128, 64), torch.randn(1, 1, 128, 64), positions=pos.numpy())
        s.truncate(500)
        s.append(0, torch.randn(1, 1, 65, 64), torch.randn(1, 1, 65, 64))
        print(s.seq_lens(0)[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(127 + 65)


def _reference_mean(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    w = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / 8.0, dim=-1)
    return w @ v.double()


def test_vanishing_value_weights_stay_finite():
    # A page ~86 below the running maximum with nearly constant values used to give NaN.
    s = KVStore(1, 1, 64, config=QuantConfig(bits=4))
    gen = torch.Generator().manual_seed(0)
    k = torch.cat([torch.full((1, 1, 64, 64), 10.75), torch.zeros(1, 1, 64, 64)], dim=2)
    v = torch.cat(
        [
            torch.randn(1, 1, 64, 64, generator=gen),
            5 + 1e-3 * torch.randn(1, 1, 64, 64, generator=gen),
        ],
        dim=2,
    )
    s.append(0, k, v)
    out = s.attend(0, torch.ones(1, 1, 1, 64))
    assert torch.isfinite(out).all()
    _, kd, vd = s.dequantize(0, 0)
    want = _reference_mean(
        torch.from_numpy(kd)[:, 0], torch.from_numpy(vd)[:, 0], torch.ones(1, 64)
    )
    torch.testing.assert_close(out[0, 0].double(), want, atol=1e-3, rtol=1e-3)


def test_vanishing_query_rows_are_not_dropped():
    # A finite query whose largest entry is ~1e-42 used to come out as zeros.
    s = KVStore(1, 1, 64, config=QuantConfig(bits=4))
    gen = torch.Generator().manual_seed(1)
    v = 3 + torch.rand(1, 1, 40, 64, generator=gen)
    s.append(0, torch.randn(1, 1, 40, 64, generator=gen), v)
    q = torch.zeros(1, 2, 1, 64)
    q[..., 0] = 1e-42
    out = s.attend(0, q)
    _, _, vd = s.dequantize(0, 0)
    torch.testing.assert_close(
        out[0, 0, 0].double(), torch.from_numpy(vd)[:, 0].double().mean(0), atol=1e-3, rtol=1e-3
    )


def _resign(raw: bytes, edit: object) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    meta = hdr["__metadata__"]
    st = json.loads(meta["store"])
    tensors = {k: v for k, v in hdr.items() if k != "__metadata__"}
    edit(st, tensors)  # type: ignore[operator]
    meta["store"] = json.dumps(st)
    meta["store_checksum"] = _fnv(meta["store"].encode())
    sums = json.loads(meta["checksums"])
    new_body = b""
    out = {"__metadata__": meta}
    for name, info in tensors.items():
        a, b = info.pop("orig", info["data_offsets"])
        data = info.pop("data", body[a:b])
        info["data_offsets"] = [len(new_body), len(new_body) + len(data)]
        new_body += data
        sums[name] = _fnv(data)
        out[name] = info
    meta["checksums"] = json.dumps(sums)
    h = json.dumps(out).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + new_body


def _huge_dims(st: dict, tensors: dict) -> None:
    st.update(num_layers=0, heads=2**62, head_dim=1, seqs=[])
    tensors["plan.key_perm"].update(shape=[0], data=b"")


@pytest.mark.parametrize("case", ["huge_dims", "next_pos"])
def test_crafted_store_headers_raise_format_errors(tmp_path, case):
    s = KVStore(1, 1, 64, config=QuantConfig(bits=4))
    s.append(0, torch.randn(1, 1, 3, 64), torch.randn(1, 1, 3, 64))
    path = tmp_path / "a.rkv"
    s.save(path)

    def next_pos(st: dict, tensors: dict) -> None:
        st["seqs"][0]["next_pos"] = 2**62

    edit = _huge_dims if case == "huge_dims" else next_pos
    (tmp_path / "b.rkv").write_bytes(_resign(path.read_bytes(), edit))
    with pytest.raises(rotatekv.FormatError):
        KVStore.load(tmp_path / "b.rkv")


def test_crafted_window_tags_raise_format_errors(tmp_path):
    s = KVStore(1, 1, 64, config=QuantConfig(bits=2, residual=8))
    s.append(0, torch.randn(1, 1, 5, 64), torch.randn(1, 1, 5, 64))
    path = tmp_path / "a.rkv"
    s.save(path)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8 : 8 + n])
    st = json.loads(hdr["__metadata__"]["store"])
    (idx, *_rest) = st["seqs"][0]["pages"][-1]  # the window page
    a, _ = hdr[f"page.{idx}"]["data_offsets"]

    def tag5(st: dict, tensors: dict) -> None:
        info = tensors[f"page.{idx}"]
        data = bytearray(raw[8 + n + a : 8 + n + info["data_offsets"][1]])
        data[4 * 64] = 5  # slot 0's tag
        info["data"] = bytes(data)

    (tmp_path / "b.rkv").write_bytes(_resign(raw, tag5))
    with pytest.raises(rotatekv.FormatError, match="tag"):
        KVStore.load(tmp_path / "b.rkv")
    assert torch.isfinite(KVStore.load(path).attend(0, torch.ones(1, 1, 1, 64))).all()
