# make quickstart: create .venv, install, train configs/quickstart.yaml, print the summary
# make test:       create .venv if needed, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# An existing torch (CUDA or CPU) is kept; otherwise this pinned CPU build is installed.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install quickstart baseline test test-fast benchmarks clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/faithful-train fit -c configs/quickstart.yaml

baseline: install
	$(VENV)/bin/faithful-train fit -c configs/quickstart-baseline.yaml

# both cores: two pytest workers; the 2-process DDP tests share one worker (never side by side)
test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=20

test-fast: install
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow and not distributed"

# pyvene is a benchmark peer only: installed beside the venv (--no-deps keeps our torch)
.bench/pyvene: | install
	$(PY) -m pip install --quiet --no-deps --target .bench "pyvene==0.1.8"

benchmarks: install .bench/pyvene
	PYVENE_LIB=.bench $(PY) benchmarks/interchange_step.py
	$(PY) benchmarks/router_step.py
	$(PY) benchmarks/attribution.py
	$(PY) benchmarks/stability_step.py
	$(PY) benchmarks/text_step.py

clean:
	rm -rf $(VENV) runs wandb .pytest_cache .bench
