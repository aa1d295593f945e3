"""Prior-capability probes: what the model could do before fine-tuning, measured offline.

The general suite (`resources/probes/general.json`, written for this project) holds short
factual, arithmetic and commonsense questions with verifiable answers and instruction-following
prompts with programmatic checks in the style of IFEval. Each item lists one or more checks;
an output scores 1 when every check passes. Answers are generated greedily, so a score is a
property of the weights alone.

`probe_report` adds drift from the base model (see `drift.py`), optionally HumanEval, and the
difference to the base model's own scores, so forgetting reads directly as a negative delta.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from selfdistill.data.records import Record
from selfdistill.errors import UserError
from selfdistill.eval.graders import last_number, normalize


def load_suite(name: str = "general") -> list[dict]:
    path = resources.files("selfdistill") / "resources" / "probes" / f"{name}.json"
    if not path.is_file():
        raise UserError(f"Unknown probe suite {name!r}.")
    return json.loads(path.read_text(encoding="utf-8"))["items"]


# --- checkers: (output, check) -> bool ------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _strip_fence(text: str) -> str:
    """The body of a ``` code fence when the output is one (models often fence JSON)."""
    fenced = re.fullmatch(r"\s*```[\w-]*\s*\n?(.*?)\n?```\s*", text, flags=re.DOTALL)
    return fenced.group(1) if fenced else text


def check_answer(output: str, check: dict) -> bool:
    got = f" {normalize(output)} "
    return any(f" {normalize(a)} " in got for a in check["any"])


def check_number(output: str, check: dict) -> bool:
    got = last_number(output)
    return got is not None and abs(got - float(check["value"])) <= float(check.get("tolerance", 1e-6))


def check_json(output: str, check: dict) -> bool:
    try:
        value = json.loads(_strip_fence(output).strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and all(k in value for k in check.get("keys", []))


def check_bullets(output: str, check: dict) -> bool:
    bullets = [line for line in output.splitlines() if re.match(r"\s*[-*•]\s+\S", line)]
    return len(bullets) == int(check["n"])


def check_include(output: str, check: dict) -> bool:
    words = {w.lower() for w in _words(output)}
    return all(w.lower() in words for w in check["words"])


def check_exclude(output: str, check: dict) -> bool:
    words = {w.lower() for w in _words(output)}
    return not any(w.lower() in words for w in check["words"])


def check_paragraphs(output: str, check: dict) -> bool:
    paragraphs = [p for p in re.split(r"\n\s*\n", output.strip()) if p.strip()]
    return len(paragraphs) == int(check["n"])


CHECKERS: dict[str, Callable[[str, dict], bool]] = {
    "answer": check_answer,
    "number": check_number,
    "max_words": lambda o, c: 0 < len(_words(o)) <= int(c["n"]),
    "min_words": lambda o, c: len(_words(o)) >= int(c["n"]),
    # Case checks need at least one letter, so an empty output does not pass them.
    "lowercase": lambda o, c: any(ch.isalpha() for ch in o) and o == o.lower(),
    "uppercase": lambda o, c: any(ch.isalpha() for ch in o) and o == o.upper(),
    "json": check_json,
    "bullets": check_bullets,
    "include": check_include,
    "exclude": lambda o, c: bool(o.strip()) and check_exclude(o, c),
    "starts_with": lambda o, c: o.strip().lower().startswith(c["text"].lower()),
    "ends_with": lambda o, c: o.strip().lower().endswith(c["text"].lower()),
    "no_commas": lambda o, c: bool(o.strip()) and "," not in o,
    "quoted": lambda o, c: len(o.strip()) >= 2 and o.strip()[0] in '"“' and o.strip()[-1] in '"”',
    "title": lambda o, c: re.search(r"<<[^<>\n]+>>", o) is not None,
    "paragraphs": check_paragraphs,
}


def check_item(output: str, item: dict) -> float:
    """1.0 when every check of the item passes."""
    for check in item["check"]:
        if check["type"] not in CHECKERS:
            raise ValueError(f"probe {item['id']}: unknown check {check['type']!r}")
        if not CHECKERS[check["type"]](output, check):
            return 0.0
    return 1.0


def _probe_grader(output: str, record: dict) -> float:
    return check_item(output, record["probe"])


def spread_sample(items: list[dict], limit: int | None) -> list[dict]:
    """`limit` items taken in turn from each category (file order inside a category).

    The suite is stored category by category, so its first N items would all be factual
    questions: a small limit must still measure every kind of prior capability."""
    if limit is None or limit >= len(items):
        return list(items)
    by_category: dict[str, list[dict]] = {}
    for item in items:
        by_category.setdefault(item["category"], []).append(item)
    queues = list(by_category.values())
    chosen: list[dict] = []
    while len(chosen) < limit:
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def run_probes(
    model,
    tokenizer,
    *,
    suite: str = "general",
    limit: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    precision: str = "fp32",
    out_dir: str | Path | None = None,
) -> dict:
    """Score the model on the probe suite: overall and per category (greedy)."""
    from selfdistill.eval.evaluate import evaluate, wilson_interval

    items = spread_sample(load_suite(suite), limit)
    records = [
        Record(
            prompt=item["prompt"],
            demonstration="",
            meta={"probe": item, "category": item["category"]},
            source=f"probe {item['id']}",
        )
        for item in items
    ]
    examples: list[dict] = []
    summary = evaluate(
        model,
        tokenizer,
        records,
        _probe_grader,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        precision=precision,
        out_dir=out_dir,
        desc="probes",
        examples=examples,
    )
    scores = [e["score"] for e in examples]
    result = {"score": summary["score"], "count": summary["count"], "ci95": summary["ci95"], "categories": {}}
    for category in sorted({item["category"] for item in items}):
        values = [s for s, item in zip(scores, items) if item["category"] == category]
        mean = sum(values) / len(values)
        result["categories"][category] = {
            "score": mean,
            "count": len(values),
            "ci95": list(wilson_interval(mean, len(values))),
        }
    return result


def relative(model_scores: dict, base_scores: dict) -> dict:
    """model minus base for every score both have (negative = forgotten)."""
    delta = {}
    for key, value in model_scores.items():
        if isinstance(value, dict) and isinstance(base_scores.get(key), dict):
            inner = relative(value, base_scores[key])
            if inner:
                delta[key] = inner
        elif (
            key in ("score", "pass_at_1")
            and isinstance(value, (int, float))
            and isinstance(base_scores.get(key), (int, float))
        ):
            delta[key] = value - base_scores[key]
    return delta


def probe_report(
    model_name: str,
    base_name: str | None,
    *,
    out_dir: Path,
    load,
    limit: int | None = None,
    suite: bool = True,
    humaneval: bool = False,
    batch_size: int = 16,
    precision: str = "bf16",
    max_new_tokens: int = 128,
    drift_tokens: int = 64,
) -> dict:
    """Probe scores of `model_name`, and with a base model: the base's scores, deltas and drift; written
    to `out_dir/report.json`. `limit` N takes N items of each suite and the first N drift prompts.

    The base model's scores and greedy answers are stored in `out_dir/base/` and reused when
    they were computed for the same base model and limit, so comparing many checkpoints with
    one base pays for the base once.
    """
    from selfdistill.eval import drift as drift_mod

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _ProbeSettings(suite, humaneval, limit, batch_size, precision, max_new_tokens)
    net, tok = load(model_name)
    report: dict = {"model": model_name, "absolute": settings.scores(net, tok, out_dir / "model")}
    if base_name is None:
        report["relative"] = None
        report["note"] = "pass --base to get scores relative to the base model and drift"
    else:
        base_dir = out_dir / "base"
        base_scores, base = _base_scores(base_name, base_dir, load, settings)
        answers_path = base_dir / "drift_answers.json"
        prompts = drift_mod.drift_prompts()[:limit]  # --limit N: the first N drift prompts, as for every suite
        answers = drift_mod.load_base_answers(answers_path, base_name)
        if answers is None or answers.get("max_new_tokens") != drift_tokens or answers.get("prompts") != prompts:
            base_net, base_tok = base if base is not None else load(base_name)
            answers = drift_mod.base_answers(
                base_net,
                base_tok,
                prompts=prompts,
                base_name=base_name,
                precision=precision,
                max_new_tokens=drift_tokens,
            )
            drift_mod.save_base_answers(answers, answers_path)
        report["base"] = {"model": base_name, "absolute": base_scores}
        report["relative"] = relative(report["absolute"], base_scores)
        report["drift"] = drift_mod.drift(answers, net, tok)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@dataclass(frozen=True)
class _ProbeSettings:
    """What probe_report measures, and how: the same for the model and its base."""

    suite: bool
    humaneval: bool
    limit: int | None
    batch_size: int
    precision: str
    max_new_tokens: int

    def scores(self, net, tok, where: Path) -> dict:
        result = {}
        common = {"limit": self.limit, "batch_size": self.batch_size, "precision": self.precision}
        if self.suite:
            result["general"] = run_probes(
                net, tok, max_new_tokens=self.max_new_tokens, out_dir=where / "general", **common
            )
        if self.humaneval:
            from selfdistill.eval.humaneval import run_humaneval

            result["humaneval"] = run_humaneval(net, tok, out_dir=where / "humaneval", **common)
        return result


def _base_scores(base_name: str, base_dir: Path, load, settings: _ProbeSettings) -> tuple[dict, tuple | None]:
    """The base model's scores, from base_dir/scores.json when they were measured the same way; and the
    (model, tokenizer) loaded to measure them, None when they came from the file."""
    cache = base_dir / "scores.json"
    key = {
        "base": base_name,
        "limit": settings.limit,
        "suite": settings.suite,
        "humaneval": settings.humaneval,
        "max_new_tokens": settings.max_new_tokens,
    }
    if cache.is_file() and json.loads(cache.read_text()).get("key") == key:
        return json.loads(cache.read_text())["scores"], None
    base = load(base_name)
    scores = settings.scores(*base, base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "scores": scores}, indent=2) + "\n")
    return scores, base
