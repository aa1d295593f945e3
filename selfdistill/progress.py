"""Progress of long loops (training, generation, evaluation), and silence for other libraries' bars.

How progress shows is chosen by the environment variable SELFDISTILL_PROGRESS:
- unset: a live bar on a terminal; elsewhere (a log file, a pipe) a few plain lines per loop.
- `bar`/`1`: always a live bar.  `lines`: always plain lines.  `0`: nothing.
Worker processes of `sdft continual`/`demo` use `lines`, prefixed with their method and seed
(SELFDISTILL_PROGRESS_LABEL), so several workers writing to one terminal never garble each
other's output: each line is written whole and flushed.
"""

from __future__ import annotations

import os
import sys

ENV = "SELFDISTILL_PROGRESS"
LABEL_ENV = "SELFDISTILL_PROGRESS_LABEL"
LINES_PER_LOOP = 4  # plain-lines mode reports at 25%, 50%, 75% and 100%


def progress_mode() -> str:
    """'bar', 'lines' or 'off', from SELFDISTILL_PROGRESS and whether stderr is a terminal."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "bar", "true", "yes"):
        return "bar"
    if value == "lines":
        return "lines"
    return "bar" if sys.stderr.isatty() else "lines"


class LineProgress:
    """A tqdm-like counter that prints a whole line at each quarter of the loop, to stdout."""

    def __init__(self, total: int, desc: str | None, label: str = ""):
        self.total, self.desc, self.label, self.n = max(int(total or 0), 0), desc or "progress", label, 0
        self._reported = 0
        self.postfix = ""
        # A loop that sets a postfix (the training loss) does so right after update(): the line then
        # waits for it, so it shows this step's value rather than the previous one's.
        self._uses_postfix = self._pending = False

    def _print(self) -> None:
        prefix = f"{self.label} " if self.label and not self.desc.startswith(self.label) else ""
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{prefix}{self.desc}: {self.n}/{self.total}{extra}", flush=True)
        self._pending = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.total <= 0:
            return
        quarter = min(LINES_PER_LOOP, self.n * LINES_PER_LOOP // self.total)
        if quarter > self._reported:
            self._reported = quarter
            if self._uses_postfix:
                self._pending = True
            else:
                self._print()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix, self._uses_postfix = text, True
        if self._pending:
            self._print()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in items.items()))

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def close(self) -> None:
        if self._pending:
            self._print()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str | None = None, **kwargs):
    """A progress counter for a loop of `total` items: a tqdm bar, plain lines, or a silent one."""
    from tqdm.auto import tqdm

    mode = progress_mode()
    if mode == "lines":
        return LineProgress(total, desc, os.environ.get(LABEL_ENV, ""))
    return tqdm(total=total, desc=desc, disable=mode == "off", dynamic_ncols=True, leave=False, **kwargs)


def quiet_third_party_bars() -> None:
    """Silence transformers' weight-loading / shard-writing and the Hub's and datasets' bars, which
    would interleave with ours. Environment variables reach libraries imported later and worker
    processes; libraries already imported are told directly. A user's own setting is kept."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] != "1":
        return
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
