# Two commands from a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo train-demo ablation-demo test bench-download clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# This exact torch pair is on the local disk of these machines (see shared/GUIDE.md §4):
	# asking for it first keeps the install offline and avoids a multi-GB download.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# Everything: the train extra (curate train / eval, the vae_latents filter) too.
	$(BIN)/pip install -q -e '.[dev,train]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m curate.pipeline.demo

# Fine-tunes curate's tiny latent diffusion model on the demo's shards (CPU, a few minutes).
train-demo: $(STAMP)
	@test -d demo-output/shards || $(MAKE) demo
	$(BIN)/python -m curate.pipeline.cli train configs/train-demo.yaml

# Does curation help the model? The tiny model trained twice on the demo's data (raw, curated),
# same seed and steps, then `curate eval` on the same held-out prompts: one table (CPU, minutes).
# On a GPU, with more steps: python -m curate.train.eval.ablation --steps 3000 --benchmarks BENCHMARKS.md
ablation-demo: $(STAMP)
	$(BIN)/python -m curate.train.eval.ablation

test: $(STAMP)
	# tests/e2e/test_report_run.py opens the run report in Debian's headless Chromium.
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; fi
	$(BIN)/python -m pytest -q

bench-download: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/download.py

clean:
	rm -rf demo-data demo-output bench-work ablation-work
