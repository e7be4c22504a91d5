# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

# CPU machines pin the torch build that lies on local disk; a GPU machine (nvidia-smi
# present) keeps whatever CUDA build the range in pyproject.toml resolves to.
TORCH_PIN := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "torch==2.13.0")

.PHONY: run demo test bench install clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VPY)
	$(VPY) -m pip install --quiet $(TORCH_PIN)
	$(VPY) -m pip install --quiet -e ".[dev]" $(TORCH_PIN)
	touch $(STAMP)

install: $(STAMP)

# A small GPT learns Python from the standard library's source (~2 min on 2 cores).
run: $(STAMP)
	$(VPY) launch/run_gpt.py

# The smaller example: a convnet on noisy 8x8 digits (~20 s).
demo: $(STAMP)
	$(VPY) launch/demo.py

test: $(STAMP)
	$(VPY) -m pytest -q --durations=20

# Benchmarks into benchmarks/RESULTS.md (~8-10 min on 2 cores); BENCH_ARGS=--quick for a smoke run.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(VPY) -m pip install --quiet -e ".[dev,bench]" $(TORCH_PIN)
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(VPY) -m benchmarks.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
