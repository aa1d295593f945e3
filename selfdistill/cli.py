"""The `sdft` command."""

from __future__ import annotations

import logging
import sys

import typer

from selfdistill.errors import UserError

app = typer.Typer(
    help="Continual learning of language models from demonstrations with Self-Distillation Fine-Tuning (SDFT).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Sub-commands register themselves here (one import each; the modules define them).
# (section: commands)
from selfdistill.eval.cli import register as _r_eval; _r_eval(app)  # noqa: E402
from selfdistill.tasks.cli import register as _r_data; _r_data(app)  # noqa: E402,E702


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except UserError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
