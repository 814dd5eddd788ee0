# The two commands in the README's first lines are `make demo` and `make test`.
PY := .venv/bin/python
DEMO := runs/demo

.PHONY: install demo demo-quick test test-fast lint bench gpu-check clean-demo

install:
	bash scripts/install.sh

demo: install
	$(PY) -m pipelines.demo --out $(DEMO)

demo-quick: install
	$(PY) -m pipelines.demo --out runs/demo-quick --quick

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: install
	$(PY) -m pipelines.benchmark score
	$(PY) -m pipelines.benchmark extract
	$(PY) -m pipelines.benchmark retrieve
	$(PY) -m pipelines.benchmark eval
	$(PY) -m pipelines.benchmark serve
	$(PY) -m pipelines.benchmark train

# every device path on a GPU in under 8 minutes; without CUDA, the CPU half only (CI runs it)
gpu-check: install
	PY=$(PY) bash scripts/gpu_check.sh

clean-demo:
	rm -rf $(DEMO) runs/demo-quick
