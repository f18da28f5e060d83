# make quickstart: create .venv, install, train configs/quickstart.yaml, print the summary
# make test:       create .venv if needed, install the parity peers beside it, lint, run the tests (not the slow ones)
# make test-slow:  the convergence tests and the 2-process DDP/FSDP/sweep tests (CI runs both)
# make docs:       build the documentation site with --strict (a broken link or reference fails)
VENV ?= .venv
PY := $(VENV)/bin/python
# An existing torch (CUDA or CPU) is kept; otherwise this pinned CPU build is installed.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install quickstart baseline test test-slow lint docs benchmarks benchmark-scale clean

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

# the peers the parity tests compare with (TransformerLens, sparsify), beside the venv
PEERS := .bench/transformer_lens .bench/sparsify

# both cores: two pytest workers. `test` leaves out the convergence tests (marked slow) and the
# 2-process ones (marked distributed); `test-slow` runs those, the 2-process ones on one worker
test: install $(PEERS) lint
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 -m "not slow and not distributed"

test-slow: install $(PEERS)
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15 -m "slow or distributed"

lint: install
	$(VENV)/bin/ruff check faithful_train tests benchmarks recipes

$(VENV)/.docs: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# pyvene is a benchmark peer only: installed beside the venv (--no-deps keeps our torch)
.bench/pyvene: | install
	$(PY) -m pip install --quiet --no-deps --target .bench "pyvene==0.1.8"

# TransformerLens likewise (a patching peer): --no-deps, and only the packages it imports that the
# venv lacks (torch and transformers stay the venv's)
.bench/transformer_lens: | install
	$(PY) -m pip install --quiet --no-deps --target .bench "transformer-lens==4.3.0" "accelerate==1.15.0" \
		"beartype==0.23.1" "einops==0.8.2" "fancy-einsum==0.0.3" "jaxtyping==0.3.11" "typeguard==4.6.1" "wadler-lindig==0.1.8"

# sparsify (EleutherAI's SAEs, PyPI eai-sparsify) likewise: a parity and throughput peer only
.bench/sparsify: | install
	$(PY) -m pip install --quiet --no-deps --target .bench "eai-sparsify==1.3.3" "simple-parsing==0.1.9" \
		"natsort==8.4.0" "docstring-parser==0.18.0" "schedulefree==1.4.1" "einops==0.8.2" "accelerate==1.15.0"

benchmarks: install .bench/pyvene .bench/transformer_lens .bench/sparsify
	PYVENE_LIB=.bench $(PY) benchmarks/interchange_step.py
	$(PY) benchmarks/router_step.py
	$(PY) benchmarks/attribution.py
	$(PY) benchmarks/stability_step.py
	$(PY) benchmarks/text_step.py
	TL_LIB=.bench $(PY) benchmarks/patching.py
	$(PY) benchmarks/retrieval.py
	SPARSIFY_LIB=.bench $(PY) benchmarks/sae.py
	$(PY) benchmarks/edges.py --memory
	$(PY) benchmarks/graphs.py

# steps of every objective on a GPT-2-small shape and a 1B llama (about an hour on 2 CPU cores)
benchmark-scale: install
	$(PY) benchmarks/scale.py

clean:
	rm -rf $(VENV) runs wandb .pytest_cache .bench
