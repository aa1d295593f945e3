"""`write_report(run_dir)`: results.json, report.html (figures inline) and report.md (figures beside it) of a run."""

from __future__ import annotations

import time
from pathlib import Path

from selfdistill.continual import layout
from selfdistill.continual.results import write_results
from selfdistill.files import write_atomic
from selfdistill.report import html, markdown, plots, tables


def write_report(run_dir: str | Path) -> dict:
    """(Re)build results.json from the run's files, draw the figures, write both reports; returns paths."""
    out = Path(run_dir)
    results = write_results(out)
    figures = plots.all_figures(results, out)
    per_task = int(results["config"].get("eval", {}).get("samples", 3))
    samples = tables.samples(results, out, per_task) if "start" in results else []
    config = results["config"]
    model = config.get("base", {}).get("model", {}).get("name", "smollm2-135m")
    intro = (
        f"Run {out.resolve()} - model {model}; stream: {' -> '.join(t['name'] for t in results['tasks'])}; "
        f"methods: {', '.join(results['methods'])}; seeds: {', '.join(map(str, config['seeds']))}. "
        f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    write_atomic(out / layout.REPORT_HTML, html.render(results, figures, samples, intro))
    files_dir = out / layout.REPORT_FILES
    files_dir.mkdir(exist_ok=True)
    for old in files_dir.glob("*.png"):  # figures of an older version of the report
        if old.stem not in {f.key for f in figures}:
            old.unlink()
    figure_files = []
    for figure in figures:
        name = f"{figure.key}.png"
        write_atomic(files_dir / name, figure.png)
        figure_files.append((figure, f"{layout.REPORT_FILES}/{name}"))
    write_atomic(out / layout.REPORT_MD, markdown.render(results, figure_files, samples, intro))
    return {
        "results": out / layout.RESULTS,
        "html": out / layout.REPORT_HTML,
        "markdown": out / layout.REPORT_MD,
        "figures": len(figures),
        "data": results,
    }
