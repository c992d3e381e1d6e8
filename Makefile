# The two set-up commands of the README: `make demo` (main job on the embedded default) and
# `make test`. Both create .venv/ first (torch, timm, zarr, MinkowskiEngine built CPU-only).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hgkd-installed

.PHONY: install demo test bench clean

$(STAMP): setup.cfg setup.py pyproject.toml .ci/install.sh
	bash .ci/install.sh
	touch $(STAMP)

install: $(STAMP)

# Main job on the embedded default (scikit-learn's digits, shipped in the package): a mini
# MAE teacher pre-trained on them -> cache -> H-GKD sparse ResNet-18 and a no-distillation
# ResNet-18 -> kNN / MLP probe / fine-tune (all labels, 10 per class) / Mask R-CNN -> table + plot in demo-out/.
demo: $(STAMP)
	$(VENV)/bin/hgkd-pipeline demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf demo-out demo-out.locks .pytest_cache
