# Two entry points: `make demo` (set up, then compress the shipped baseline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench

$(BIN)/agmc: pyproject.toml
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or pass --data-dir DIR holding the IDX files"; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/agmc

demo: setup
	$(BIN)/agmc compress --workdir agmc_jax/baselines/lenet5_fashion_mnist --out runs/demo --resume --method agmc \
	  --target-macs 0.5 --episodes 100 --reward-images 1000 --finetune-epochs 1

# The longest test files first (measured with --durations=0): xdist hands out whole files in this order, so the two
# workers finish together.
FIRST := tests/test_search.py tests/test_notebooks.py tests/test_hosts.py tests/test_faults.py tests/test_cli.py \
	tests/test_train.py tests/test_devices.py tests/test_admm.py tests/test_compress.py tests/test_stages.py

test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile $(FIRST) $(filter-out $(FIRST),$(wildcard tests/test_*.py))

bench: setup
	$(BIN)/python experiments/bench_train.py
	$(BIN)/python experiments/bench_slim.py
	$(BIN)/python experiments/bench_search.py
