#!/usr/bin/env bash
# Creates benchmarks/.venv-trl with TRL's SDFT trainer, for the comparison run by `python -m benchmarks.run trl` (benchmarks/trl_driver.py).
# TRL is never a dependency of selfdistill: it lives only in this separate, gitignored environment.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv-trl"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0   # the CPU build on disk; a plain 'torch' may pull a CUDA build
# The same transformers/accelerate/datasets as selfdistill's environment, so both sides run the same model code.
"$venv/bin/pip" install -q trl==1.16.0 transformers==5.24.0 accelerate==1.15.0 datasets==5.2.0
"$venv/bin/python" -c "import trl, transformers; from trl.experimental.sdft import SDFTTrainer, SDFTConfig; print('trl', trl.__version__, 'transformers', transformers.__version__)"
