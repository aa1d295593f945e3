"""The `sdft` command: the typer app, its command groups (selfdistill.commands) and the exit statuses."""

from __future__ import annotations

import logging
import signal
import sys

import typer

from selfdistill.commands import continual, data, diagnose, learn, plan, serve, train
from selfdistill.commands import eval as evaluation  # named so as not to hide the builtin eval
from selfdistill.errors import RunFailed, RunStopped, UserError

app = typer.Typer(
    help="Continual learning of language models from demonstrations with Self-Distillation Fine-Tuning (SDFT).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Train, evaluate and compare language models learning from demonstrations."""


# Each command group is a module of selfdistill.commands with a `register(app)`; the order here is
# the order of `sdft --help`.
for _group in (train, evaluation, data, continual, learn, serve, diagnose, plan):
    _group.register(app)


def main() -> None:
    """Run the `sdft` command. Exit statuses: 0 done; 2 bad input (UserError, nothing written);
    1 the run could not go on (RunFailed, last checkpoint intact); 128 + signal a deliberate stop
    (RunStopped or Ctrl-C: 130 for SIGINT, 143 for SIGTERM), so a scheduler can tell a pre-emption
    from a mistake. The first two print "error: ..."; a stop prints its own "Stopped by ..." line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from selfdistill.progress import quiet_third_party_bars

    quiet_third_party_bars()
    try:
        app()
    except (UserError, RunFailed) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(exc.exit_code)
    except RunStopped as exc:  # asked for, so not an error: its message ("Stopped by ...") says what was kept
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (inside it, the loop checkpoints and stops)
        typer.secho(
            "Stopped by Ctrl-C (SIGINT). Checkpoints and results already complete on disk are kept; "
            "a training run continues from its newest checkpoint with --resume.",
            fg=typer.colors.YELLOW,
            err=True,
        )
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    main()
