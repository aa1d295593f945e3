"""The frontier of a comparison: each method over its grid, new-task score against what was kept.

A single pair of runs compares two settings, not two methods (one learning rate may suit one
method and not the other). So every method entry is a line through its grid points, and two
methods are compared point by point where their grids share a setting. Every number carries an
interval, and a difference is called real only when the two intervals do not overlap:

- task and probe scores (one seed): the Wilson 95% interval over the evaluation items;
- drift (one seed): a t interval across the drift prompts;
- demonstration log-likelihood change (one seed): a t interval across evaluation items of the
  per-item change from the starting model (the same items, so the change is paired);
- with several seeds: the t interval across seeds of each number.

Overlapping 95% intervals is a cautious test (it calls some real differences noise); with
probe suites of a few dozen items that is the honest reading.
"""

from __future__ import annotations

import math

from selfdistill.continual.config import format_value, grid_label

# name, what it measures, which direction is better, unit
MEASURES = {
    "new_task": ("new-task score", "higher", ""),
    "prior": ("prior-capability probe score", "higher", ""),
    "drift": ("drift from the starting model", "lower", " nats/token"),
    "loglik_gain": ("held-out demonstration log-likelihood gain", "higher", " nats/token"),
}


def _wilson(mean: float, n: int | None, z: float = 1.959964) -> list[float] | None:
    if mean is None or not n:
        return None
    denom = 1 + z * z / n
    centre = (mean + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(mean * (1 - mean), 0.0) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _cell(value, ci) -> dict:
    return {"value": value, "ci95": ci}


def _combine(cells: list[dict | None]) -> dict:
    """Mean of several tasks' changes; intervals combined as independent (half-widths in quadrature)."""
    cells = [c for c in cells if c and c.get("mean") is not None]
    if not cells:
        return _cell(None, None)
    value = sum(c["mean"] for c in cells) / len(cells)
    if any(c.get("ci95") is None for c in cells):
        return _cell(value, None)
    half = math.sqrt(sum(((c["ci95"][1] - c["ci95"][0]) / 2) ** 2 for c in cells)) / len(cells)
    return _cell(value, [value - half, value + half])


def _point(entry: dict, results: dict, stage: int, final: bool) -> dict:
    """new_task / prior / drift / loglik_gain of one method after `stage`, each with its interval.

    final=True: the new-task score is the mean final score over all the stream's tasks (ACC);
    else the score on the stage's own task right after training on it.
    """
    s = entry["summary"]
    seeds = s["seeds"]
    counts = [t.get("eval_count") for t in results["tasks"]]
    first = next(iter(seq for seq in entry["seeds"].values() if seq["complete"]))
    if final:
        values = [c["mean"] for c in s["R"][stage]]
        new_value = sum(values) / len(values)
        new_ci = s["acc"]["ci95"] if seeds > 1 else _wilson(new_value, sum(c or 0 for c in counts))
    else:
        cell = s["R"][stage][stage - 1]
        new_value = cell["mean"]
        new_ci = cell["ci95"] if seeds > 1 else _wilson(new_value, counts[stage - 1])
    prior = s["prior"][stage]
    prior_ci = prior["ci95"] if seeds > 1 else _wilson(prior["mean"], results.get("prior_count"))
    drift = s["drift_kl"][stage]
    drift_ci = drift["ci95"] if seeds > 1 else (first.get("drift_kl_ci") or [None] * (stage + 1))[stage]
    changes = first.get("loglik_change", [[]] * (stage + 1))[stage]
    if final:
        gain = _combine(changes)
    else:
        gain = _combine([changes[stage - 1]] if len(changes) >= stage else [])
    if seeds > 1:  # across seeds: the mean over seeds of the per-seed changes, with its t interval
        per_seed = []
        for seq in entry["seeds"].values():
            if seq["complete"]:
                cells = seq["loglik_change"][stage] if final else seq["loglik_change"][stage][stage - 1 : stage]
                per_seed.append(_combine(cells)["value"])
        from selfdistill.continual.metrics import mean_ci

        summary = mean_ci(per_seed)
        gain = _cell(summary["mean"], summary["ci95"])
    return {
        "new_task": _cell(new_value, new_ci),
        "prior": _cell(prior["mean"], prior_ci),
        "drift": _cell(drift["mean"], drift_ci),
        "loglik_gain": gain,
    }


def _separated(a: dict, b: dict) -> bool | None:
    """True when the intervals do not overlap, False when they do, None when one is missing."""
    if a["value"] is None or b["value"] is None:
        return None
    if a["ci95"] is None or b["ci95"] is None:
        return None if a["value"] != b["value"] else False
    return a["ci95"][1] < b["ci95"][0] or b["ci95"][1] < a["ci95"][0]


def groups_of(results: dict) -> dict:
    """{group: {"method", "grid": {key: [values]}, "points": [method names in grid order]}}."""
    groups: dict = {}
    for name, entry in results["methods"].items():
        group = groups.setdefault(entry.get("group") or name, {"method": entry["method"], "grid": {}, "points": []})
        group["points"].append(name)
        for key, value in (entry.get("setting") or {}).items():
            if value not in group["grid"].setdefault(key, []):
                group["grid"][key].append(value)
    for group in groups.values():
        for values in group["grid"].values():
            try:
                values.sort()
            except TypeError:
                pass
        keys = list(group["grid"])
        order = {
            name: tuple(_sort_key(results["methods"][name]["setting"].get(k)) for k in keys) for name in group["points"]
        }
        group["points"].sort(key=lambda n: order[n])
    return groups


def _sort_key(value):
    return (0, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, str(value))


def grid_text(group: dict) -> str:
    if not group["grid"]:
        return "one setting (no grid)"
    return "; ".join(
        f"{key} in {{{', '.join(format_value(v) for v in values)}}}" for key, values in group["grid"].items()
    )


def _fmt(measure: str, cell: dict) -> str:
    value = cell["value"]
    if value is None:
        return "-"
    return f"{value:+.2f}" if measure == "loglik_gain" else f"{value:.2f}"


def analyse(results: dict) -> dict:
    """Groups, per-point numbers with intervals, point-by-point comparisons and the finding in words."""
    groups = groups_of(results)
    n = len(results["tasks"])
    points = {}
    for name, entry in results["methods"].items():
        if not entry.get("summary"):
            continue
        points[name] = {
            "group": entry.get("group") or name,
            "setting": entry.get("setting") or {},
            "label": grid_label(entry.get("setting") or {}) or name,
            "final": _point(entry, results, n, final=True),
            "stages": [_point(entry, results, k, final=False) for k in range(1, n + 1)],
        }
    grids = {g: {k: [repr(v) for v in vs] for k, vs in info["grid"].items()} for g, info in groups.items()}
    same_grid = len(groups) > 1 and len({repr(sorted(g.items())) for g in grids.values()}) == 1
    comparisons = _compare(groups, points)
    return {
        "groups": groups,
        "same_grid": same_grid,
        "points": points,
        "comparisons": comparisons,
        "finding": finding(groups, points, comparisons, same_grid),
    }


def _compare(groups: dict, points: dict) -> list[dict]:
    """For every pair of groups and every setting both ran: each measure, who is better, and whether it is noise."""
    names = list(groups)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            by_setting_a = {repr(sorted(points[p]["setting"].items())): p for p in groups[a]["points"] if p in points}
            by_setting_b = {repr(sorted(points[p]["setting"].items())): p for p in groups[b]["points"] if p in points}
            for key in by_setting_a:
                if key not in by_setting_b:
                    continue
                pa, pb = points[by_setting_a[key]], points[by_setting_b[key]]
                for measure, (_, better, _) in MEASURES.items():
                    ca, cb = pa["final"][measure], pb["final"][measure]
                    if ca["value"] is None or cb["value"] is None:
                        continue
                    separated = _separated(ca, cb)
                    if ca["value"] == cb["value"]:
                        winner = None
                    elif (ca["value"] > cb["value"]) == (better == "higher"):
                        winner = a
                    else:
                        winner = b
                    out.append(
                        {
                            "groups": [a, b],
                            "setting": pa["label"],
                            "measure": measure,
                            "values": {a: ca["value"], b: cb["value"]},
                            "ci95": {a: ca["ci95"], b: cb["ci95"]},
                            "better": winner,
                            "outside_noise": separated,
                        }
                    )
    return out


VERDICTS = {
    "new_task": ("{w} learned the new tasks better", "new-task scores did not differ beyond the noise"),
    "prior": (
        "{w} kept more of its prior capabilities",
        "prior-capability probe scores did not differ beyond the noise",
    ),
    "drift": ("{w} stayed closer to the starting model", "drift did not differ beyond the noise"),
    "loglik_gain": (
        "{w} made the held-out demonstrations more likely",
        "held-out demonstration log-likelihood gains did not differ beyond the noise",
    ),
}


def _interval_text(measure: str, value, ci) -> str:
    text = _fmt(measure, {"value": value})
    if ci:
        text += f" [{_fmt(measure, {'value': ci[0]})}, {_fmt(measure, {'value': ci[1]})}]"
    return text


def finding(groups: dict, points: dict, comparisons: list[dict], same_grid: bool) -> dict:
    """The result in plain words, computed from the comparisons (never written by hand):
    {"headline": one paragraph, "details": one line per pair, setting and measure}."""
    if not points:
        return {"headline": "No method has finished yet.", "details": []}
    if len(groups) < 2:
        name = next(iter(groups))
        best = max(points.values(), key=lambda p: p["final"]["new_task"]["value"] or 0)
        return {
            "headline": f"One method ({name}, {grid_text(groups[name])}); its best new-task score is "
            f"{best['final']['new_task']['value']:.2f} ({best['label']}).",
            "details": [],
        }
    sentences, details = [], []
    if not same_grid:
        sentences.append(
            "The methods ran over different grids ("
            + "; ".join(f"{g}: {grid_text(info)}" for g, info in groups.items())
            + "), so only settings both ran are compared."
        )
    pairs: dict = {}
    for c in comparisons:
        pairs.setdefault(tuple(c["groups"]), []).append(c)
    for (a, b), rows in pairs.items():
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        clauses = []
        for measure, (win, tie) in VERDICTS.items():
            rows_m = [r for r in rows if r["measure"] == measure]
            if not rows_m:
                continue
            details += [_detail(a, b, measure, r) for r in rows_m]
            clauses.append(_verdict(a, b, measure, rows_m, win, tie))
        where = (
            "At the same setting" if len(settings) == 1 else f"At equal settings ({len(settings)} shared grid points)"
        )
        sentences.append(f"{where}, {a} vs {b}: " + "; ".join(clauses) + ".")
    if not pairs:
        sentences.append("No setting was run by more than one method, so no point-by-point comparison is possible.")
    return {"headline": " ".join(sentences), "details": details}


def _detail(a: str, b: str, measure: str, r: dict) -> str:
    """One comparison of methods a and b at one setting, on one measure, with both intervals."""
    label, _, unit = MEASURES[measure]
    return (
        f"{r['setting']}, {label}: {a} {_interval_text(measure, r['values'][a], r['ci95'][a])} vs "
        f"{b} {_interval_text(measure, r['values'][b], r['ci95'][b])}{unit}"
        + (
            ""
            if r["outside_noise"]
            else " (within the noise)"
            if r["outside_noise"] is False
            else " (no interval to judge the noise)"
        )
    )


def _verdict(a: str, b: str, measure: str, rows_m: list[dict], win: str, tie: str) -> str:
    """What the settings' comparisons on one measure say together: a winner, a split, or no difference."""
    real = [r for r in rows_m if r["outside_noise"]]
    wins = {g: sum(1 for r in real if r["better"] == g) for g in (a, b)}
    count = f"{len(rows_m)} setting" + ("s" if len(rows_m) > 1 else "")
    if not real:
        return tie
    if wins[a] and wins[b]:
        return f"{MEASURES[measure][0]}: {a} ahead at {wins[a]}, {b} at {wins[b]} of {count}"
    winner = a if wins[a] else b
    extra = "" if len(real) == len(rows_m) else f", within the noise at the other {len(rows_m) - len(real)}"
    return win.format(w=winner) + f" (at {len(real)} of {count}{extra})"
