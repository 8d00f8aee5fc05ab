# Two commands do all the set-up on a machine with nothing installed:
#   make demo   — create .venv, install, run the guided demo on built-in data
#   make test   — same set-up, run the whole test suite
# GPU users: make demo TORCH_SPEC='torch==2.13.0' (or any CUDA build's spec).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Torch first and pinned: a loose spec would pull gigabytes of CUDA wheels on a CPU machine.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/saddlescope demo --out demo_output

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The anchors (PyHessian, curvlinops, hessian-eigenthings) are installed without their dependencies:
# theirs would replace the pinned torch with a multi-gigabyte CUDA build.
ANCHORS := pyhessian==0.1 hessian-eigenthings==1.0.0a5 curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 \
	einconv einops linear_operator opt-einsum tqdm unfoldNd

bench: $(STAMP)
	$(BIN)/pip install --quiet --no-deps $(ANCHORS)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache

# The documentation site, built offline into site/ (git-ignored): the pip install is the only download;
# mkdocs.yml keeps fonts, search and scripts local. --strict: a broken link or nav entry fails the build.
DOCS_STAMP := $(VENV)/.docs-installed
.PHONY: docs

$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
