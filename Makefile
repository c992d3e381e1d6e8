# The two set-up commands of the README: `make demo` (main job on the embedded default) and
# `make test`. Both create .venv/ first (torch, timm, zarr, MinkowskiEngine built CPU-only).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hgkd-installed

.PHONY: install demo test bench clean

$(STAMP): setup.cfg pyproject.toml .ci/install.sh
	bash .ci/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hgkd-extract demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/extract.py

clean:
	rm -rf demo-out demo-out.locks .pytest_cache
