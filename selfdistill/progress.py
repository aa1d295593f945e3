"""Progress bars for long loops (training, generation, evaluation), quiet when not on a terminal."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str | None = None, **kwargs):
    disable = os.environ.get("SELFDISTILL_PROGRESS", "") == "0" or not (sys.stderr.isatty() or os.environ.get("SELFDISTILL_PROGRESS") == "1")
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False, **kwargs)
