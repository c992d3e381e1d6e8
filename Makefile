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

# Main job on the embedded default: scikit-image's photos -> tiny CAE teacher -> cache ->
# verify -> sparse ResNet-18 student (MinkowskiEngine) -> dense timm weights.
demo: $(STAMP)
	rm -rf demo-out demo-out.locks
	$(VENV)/bin/hgkd-extract demo --out demo-out
	$(VENV)/bin/hgkd-distill run --cache demo-out/cache.zarr --data 'demo-out/data/demo-{000..001}.tar' \
	    --out demo-out/run --student resnet18 --epochs 3 --warmup-epochs 1 --batch-size 16 --queue-size 256
	$(VENV)/bin/hgkd-distill export demo-out/run --out demo-out/student-resnet18.safetensors

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/extract.py

clean:
	rm -rf demo-out demo-out.locks .pytest_cache
