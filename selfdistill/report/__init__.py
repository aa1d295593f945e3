"""Reports of continual-learning runs: `write_report(run_dir)` writes results.json, report.html and report.md."""

from selfdistill.report.build import write_report

__all__ = ["write_report"]
