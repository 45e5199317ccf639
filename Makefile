# Two commands set up everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned to the CPU build that lies on this kind of machine: any looser spec
# lets pip pull a multi-GB CUDA build. On a GPU host, override TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
DEMO_DIR ?= demo
LAYOUT_TREE := .cache/layout
export OMP_NUM_THREADS ?= 2

.PHONY: install browser nginx demo test lint typecheck bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[serve,train,dev,ray]"
	$(BIN)/python tools/layout_tree.py $(LAYOUT_TREE)
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: install
	DEMO_DIR=$(DEMO_DIR) $(BIN)/python -m galmorph.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The parts install as galmorph.{model,training,service,scoring} from top-level folders; the
# install links that layout into $(LAYOUT_TREE) (tools/layout_tree.py reads pyproject.toml), so
# mypy and editors (pyproject's [tool.pyright]) check cross-part imports, not guess them.
typecheck: install
	$(BIN)/python tools/layout_tree.py $(LAYOUT_TREE) >/dev/null
	$(BIN)/mypy $(LAYOUT_TREE)/galmorph

# The web page is tested in a real headless Chromium (Debian package), installed when absent.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "install Debian's chromium (sudo apt-get install chromium) for the browser test"; fi; }

# The proxy's configuration (docker/nginx.conf) is checked by `nginx -t` (Debian package),
# installed when absent; RUNLEVEL=1 keeps the package from starting a server on port 80.
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && RUNLEVEL=1 apt-get install -y -qq nginx >/dev/null; \
	  else echo "install Debian's nginx (sudo apt-get install nginx) for the proxy test"; fi; }

test: install browser nginx lint typecheck
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m benchmarks.run

# GPU readiness (benchmarks/gpu_check.py; about 8 minutes on one GPU, every part skipped with
# its reason on a host without one). TORCH_SPEC is installed again so that a CUDA build replaces
# the CPU one in an existing venv, e.g.
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu130 make gpu-check TORCH_SPEC=torch==2.13.0+cu130
# GPU_CHECK_ARGS passes options (--plan, --only PART...); all cores for torch here.
gpu-check: install
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	OMP_NUM_THREADS=$$(nproc) $(BIN)/python -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
