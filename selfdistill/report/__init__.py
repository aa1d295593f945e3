"""Reports of continual-learning runs: `write_report(run_dir)` writes results.json, report.html and report.md."""

from __future__ import annotations

import time
from pathlib import Path

from selfdistill.files import write_atomic


def write_report(run_dir: str | Path) -> dict:
    """(Re)build results.json from the run's files, draw the figures, write both reports; returns paths."""
    from selfdistill.continual.results import write_results
    from selfdistill.report import html, markdown, plots, tables

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
    write_atomic(out / "report.html", html.render(results, figures, samples, intro))
    files_dir = out / "report_files"
    files_dir.mkdir(exist_ok=True)
    for old in files_dir.glob("*.png"):  # figures of an older version of the report
        if old.stem not in {f.key for f in figures}:
            old.unlink()
    figure_files = []
    for figure in figures:
        name = f"{figure.key}.png"
        write_atomic(files_dir / name, figure.png)
        figure_files.append((figure, f"report_files/{name}"))
    write_atomic(out / "report.md", markdown.render(results, figure_files, samples, intro))
    return {
        "results": out / "results.json",
        "html": out / "report.html",
        "markdown": out / "report.md",
        "figures": len(figures),
        "data": results,
    }
