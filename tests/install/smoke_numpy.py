"""The installed wheel in a clean virtualenv without torch (`make test-install`): the library
with numpy arrays, checked against a numpy reference, and the command line's first answers.
Not collected by pytest: it runs in its own virtualenv."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import numpy as np

assert importlib.util.find_spec("torch") is None, "this virtualenv must not have torch"

import rotatekv  # noqa: E402

rng = np.random.default_rng(0)
L, HKV, HQ, D, T = 1, 2, 4, 64, 77  # odd token count: a partial page


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal-free attention of one query per head over all keys (GQA), float64."""
    g = HQ // HKV
    kk, vv = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, kk) / np.sqrt(D)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), vv)


k = rng.standard_normal((1, HKV, T, D)).astype(np.float32)
v = rng.standard_normal((1, HKV, T, D)).astype(np.float32)
q = rng.standard_normal((1, HQ, 1, D)).astype(np.float32)
want = reference(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
for bits, tol in ((16, 2e-3), (4, 0.2), (2, 0.65)):
    cfg = rotatekv.QuantConfig(bits=bits, residual=0)
    plan = rotatekv.RotationPlan.hadamard(L, HKV, D, mode="post_rope", group_heads=None)
    store = rotatekv.KVStore(L, HKV, D, batch_size=1, config=cfg, plan=plan)
    store.append(0, k, v)
    out = np.asarray(store.attend(0, q, positions=np.array([[T]]), causal=True))
    assert out.shape == want.shape and out.dtype == np.float32, (out.shape, out.dtype)
    err = float(np.linalg.norm(out - want) / np.linalg.norm(want))
    assert err < tol, f"bits={bits}: relative error {err:.4f} >= {tol}"
    print(
        f"numpy store, {bits}-bit: relative error {err:.4f}, {store.bits_per_element():.2f} "
        "bits per element"
    )

# A bad argument is a RotateKVError naming it, not a crash.
try:
    rotatekv.QuantConfig(bits=5)
except rotatekv.RotateKVError as e:
    assert "bits" in str(e), e
else:
    raise AssertionError("bits=5 was accepted")

cli = [sys.executable, "-m", "rotatekv"]
r = subprocess.run([*cli, "--version"], capture_output=True, text=True, timeout=60)
assert r.returncode == 0 and r.stdout.strip() == f"rotatekv {rotatekv.__version__}", r
start = time.monotonic()
r = subprocess.run([*cli, "eval", "--methods", "bogus"], capture_output=True, text=True,
                   timeout=60)  # fmt: skip
took = time.monotonic() - start
lines = r.stderr.strip().splitlines()
assert r.returncode == 2 and len(lines) == 1 and "bogus" in lines[0], r.stderr
assert took < 2.0, f"`rotatekv eval --methods bogus` took {took:.1f} s"
print(f"cli: --version ok, a bad method answered in one line in {took:.2f} s")
print("ok")
