#!/usr/bin/env bash
# The GPU check: what the device machine runs in its one call (docs/cuda.md).
#   run(command="bash benches/gpu_check.sh", carry=["dist"], timeout_s=600)
# It installs the abi3 wheel built on the CPU machine (`maturin build --release` into dist/)
# without dependencies, so the machine's own torch and numpy stay; runs the CUDA tests; then
# the GPU benchmarks. Everything lands under $OUT (JSON, logs, a markdown table). It must
# finish well inside 10 minutes: the tests are bounded to 4 and the benchmarks to 5.
set -uo pipefail
OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT"
WHEEL=$(ls dist/rotatekv-*abi3*.whl 2>/dev/null | head -n 1)
if [ -z "$WHEEL" ]; then echo "gpu_check: no wheel in dist/ (maturin build --release -o dist)"; exit 2; fi
python3 -m pip install -q --no-deps --no-index --target /tmp/rkv "$WHEEL" || exit 1
export PYTHONPATH=/tmp/rkv PYTHONUNBUFFERED=1 ROTATEKV_CACHE=/tmp/rkv-cache
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 - <<'PY' 2>&1 | tee "$OUT/env.txt"
import time, torch, rotatekv, rotatekv.cuda as c
t = time.time()
print("torch", torch.__version__, "gpu", torch.cuda.get_device_name(), "rotatekv", rotatekv.__version__)
print("available", c.is_available(), "nvrtc", c.nvrtc_dir(), c.nvrtc_version())
s = rotatekv.KVStore(1, 8, 128, device="cuda")
print("first device store (NVRTC compile + module load):", round(time.time() - t, 2), "s")
PY
timeout 240 python3 -m pytest -q -m cuda tests/test_cuda.py tests/test_paged.py -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.log"
timeout 300 python3 benches/gpu_bench.py --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.md"
