"""Training methods: each turns a batch of records into a loss; the loop in train.py is shared."""

from selfdistill.methods.base import Method, TrainItem
from selfdistill.methods.cpt import CPT
from selfdistill.methods.dft import DFT
from selfdistill.methods.offline_distill import OfflineDistill
from selfdistill.methods.sdft import SDFT
from selfdistill.methods.sft import SFT
from selfdistill.methods.sft_reinvoke import SFTReinvoke

REGISTRY: dict[str, type[Method]] = {
    "sdft": SDFT, "sft": SFT, "dft": DFT, "offline_distill": OfflineDistill, "cpt": CPT, "sft_reinvoke": SFTReinvoke,
}


def get_method(name: str) -> type[Method]:
    return REGISTRY[name]


__all__ = ["Method", "TrainItem", "REGISTRY", "get_method"]
