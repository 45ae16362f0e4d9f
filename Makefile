# diffrl developer entry points. Each target creates or refreshes .venv itself.
#   make demo     build, then RL (NFTTrainer + LoRA, preset shapes-nft) on the built-in shapes model with a colour habit, before/after held-out accuracy with its 95% interval (CPU, ~8 min after the venv)
#   make bench    build, then benchmark the fused ops on this machine (results in bench/results/)
#   make test     build, then run the test suite (Triton kernels under TRITON_INTERPRET=1 on a CPU)
#   make install  only build: .venv with diffrl installed editable, with its dev extras

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines here install torch from a local wheel; pin what the suite was verified with
# (NVRTC at the release of the toolkit's nvcc, 13.0, so tests/test_cupy.py compares like with like).
PINS ?= torch==2.13.0 triton==3.7.1 diffusers==0.42.1 transformers==5.23.0 accelerate==1.15.0 peft==0.21.2 \
        safetensors==0.8.0 pybind11==3.1.0 nvidia-cuda-nvrtc==13.0.88 matplotlib==3.11.2 \
        tensorboard==2.21.0 deepspeed==0.19.8
STAMP := $(VENV)/.diffrl-installed
NATIVE := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)

.PHONY: install demo test test-gpu bench bench-quick clean

install: $(STAMP)

$(STAMP): $(NATIVE)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(PINS)
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -m diffrl info
	@touch $(STAMP)

demo: install
	$(PY) -m diffrl demo --output-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install
	$(PY) -m pytest -q

test-gpu: install
	$(PY) -m pytest -q -m gpu

bench: install
	$(PY) -m bench.run

bench-quick: install
	$(PY) -m bench.run --quick

clean:
	rm -rf build *.egg-info py/diffrl/_C*.so $(STAMP)
