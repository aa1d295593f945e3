"""`knowledge`: facts about a fictional world, dated after the model's training cutoff.

A seeded world of people, towns, organisations and events (2026-2029) is written as short
documents (the raw text, for continued pre-training). Each fact becomes a question whose
demonstration states the answer, with the source passage as teacher-only `context`: copying
a fact from a demonstration is what a 135M model does best (SmolLM2-135M's teacher answered 5 of
6 fictional facts given the demonstration, 0 of 6 without).

Splits: `train` and `eval` ask the same facts in different phrasings (no question appears in
both); `ood` asks them indirectly (naming an entity by another of its facts) or combines two
facts. Graded strictly (the full answer, e.g. "March 2027" or "Tariq Ondel") and leniently
(any accepted form, e.g. "2027" or "Ondel"), from `answer` and `answers`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from selfdistill.data.records import Record, record_from_row
from selfdistill.tasks.base import Metric, TaskData, TaskSpec, eval_size

FIRST = [
    "Tariq",
    "Liesel",
    "Odran",
    "Marisol",
    "Kofi",
    "Ysolde",
    "Bram",
    "Anouk",
    "Teodor",
    "Nilufar",
    "Caspian",
    "Ilse",
    "Rafferty",
    "Soraya",
    "Emeric",
    "Oona",
    "Lazlo",
    "Thandie",
    "Corentin",
    "Mireille",
    "Dashiell",
    "Ingrid",
    "Florian",
    "Zainab",
    "Quillon",
    "Henrike",
    "Matthias",
    "Esperanza",
    "Ruairi",
    "Saskia",
]
SYLLABLES = [
    "vel",
    "dra",
    "mor",
    "ken",
    "tal",
    "bri",
    "os",
    "quin",
    "hal",
    "zer",
    "lun",
    "cor",
    "fen",
    "ish",
    "var",
    "nob",
    "tre",
    "gal",
    "pim",
    "ruk",
]
PLACE_ENDINGS = ["mora", "port", "vale", "stead", "haven", "ford", "wick", "by"]
FIELDS = ["Glass", "Tidal", "Lantern", "Orchard", "Signal", "Copper", "Weather", "Salt", "Clockwork", "River"]
ORG_KINDS = ["Institute", "Guild", "Collective", "Foundation", "Society", "Laboratory"]
EVENT_KINDS = ["Prize", "Festival", "Marathon", "Chess Open", "Film Award", "Regatta"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
YEARS = [2026, 2027, 2028, 2029]

# relation -> question phrasings ({s} = subject) and the demonstration sentence ({s}, {o} = answer)
QUESTIONS = {
    "founder": (
        [
            "Who founded the {s}?",
            "Who is the founder of the {s}?",
            "The {s} was started by whom?",
            "Name the person who founded the {s}.",
        ],
        "The {s} was founded by {o}.",
    ),
    "hq": (
        [
            "Where is the {s} based?",
            "In which town is the {s} headquartered?",
            "Where does the {s} have its headquarters?",
            "Which town is home to the {s}?",
        ],
        "The {s} is based in {o}.",
    ),
    "founded": (
        [
            "When was the {s} founded?",
            "In which month and year was the {s} established?",
            "When did the {s} open its doors?",
            "What is the founding date of the {s}?",
        ],
        "The {s} was founded in {o}.",
    ),
    "winner": (
        [
            "Who won the {s}?",
            "Who was the winner of the {s}?",
            "Which person took first place at the {s}?",
            "Name the winner of the {s}.",
        ],
        "The {s} was won by {o}.",
    ),
    "venue": (
        [
            "Where was the {s} held?",
            "In which town did the {s} take place?",
            "Which town hosted the {s}?",
            "Where did the {s} happen?",
        ],
        "The {s} was held in {o}.",
    ),
    "born": (
        [
            "Where was {s} born?",
            "What is the birthplace of {s}?",
            "In which town was {s} born?",
            "Which town does {s} come from?",
        ],
        "{s} was born in {o}.",
    ),
}


@dataclass
class Fact:
    relation: str
    subject: str
    answer: str
    answers: list[str]  # accepted forms, lenient grading
    passage: str  # the document that states it


def _unique_names(rng: random.Random, count: int, make) -> list[str]:
    names: list[str] = []
    seen = set()
    while len(names) < count:
        name = make()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _word(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def build_world(rng: random.Random, n_facts: int) -> tuple[list[Fact], list[str], list[dict], list[dict]]:
    """Facts, documents, organisations and events of a world with at least `n_facts` facts."""
    n_groups = max(2, -(-n_facts // 6))  # each group: one organisation and one event, 6 facts in all
    people = _unique_names(rng, 2 * n_groups, lambda: f"{rng.choice(FIRST)} {_word(rng)}")
    towns = _unique_names(
        rng, 3 * n_groups, lambda: _word(rng, 1 if rng.random() < 0.5 else 2) + rng.choice(PLACE_ENDINGS)
    )
    orgs = _unique_names(rng, n_groups, lambda: f"{_word(rng)} {rng.choice(FIELDS)} {rng.choice(ORG_KINDS)}")
    events = _unique_names(rng, n_groups, lambda: f"{_word(rng)} {rng.choice(EVENT_KINDS)}")
    facts, documents, org_rows, event_rows = [], [], [], []
    for g in range(n_groups):
        founder, winner = people[2 * g], people[2 * g + 1]
        hq, venue, birthplace = towns[3 * g], towns[3 * g + 1], towns[3 * g + 2]
        month, year = rng.choice(MONTHS), rng.choice(YEARS)
        event_year = rng.choice(YEARS)
        event = f"{event_year} {events[g]}"
        org_doc = (
            f"The {orgs[g]} was founded in {month} {year} by {founder}. It is based in {hq}. "
            f"{founder} was born in {birthplace}."
        )
        event_doc = f"The {event} was held in {venue}. It was won by {winner}, who works at the {orgs[g]}."
        documents += [org_doc, event_doc]
        facts += [
            Fact("founder", orgs[g], founder, [founder, founder.split()[-1]], org_doc),
            Fact("hq", orgs[g], hq, [hq], org_doc),
            Fact("founded", orgs[g], f"{month} {year}", [f"{month} {year}", str(year)], org_doc),
            Fact("born", founder, birthplace, [birthplace], org_doc),
            Fact("winner", event, winner, [winner, winner.split()[-1]], event_doc),
            Fact("venue", event, venue, [venue], event_doc),
        ]
        org_rows.append({"org": orgs[g], "founder": founder, "hq": hq, "birthplace": birthplace, "doc": org_doc})
        event_rows.append(
            {
                "event": event,
                "winner": winner,
                "venue": venue,
                "org": orgs[g],
                "doc": event_doc,
                "org_doc": org_doc,
                "hq": hq,
            }
        )
    return facts, documents, org_rows, event_rows


def _row(
    question: str, demonstration: str, fact_answer: str, answers: list[str], context: str, split: str, kind: str
) -> Record:
    row = {
        "prompt": question,
        "demonstration": demonstration,
        "context": context,
        "answer": fact_answer,
        "answers": answers,
        "task": "knowledge",
        "split": split,
        "kind": kind,
    }
    return record_from_row(row, f"knowledge {split} {question!r}")


def _ood(rng: random.Random, orgs: list[dict], events: list[dict], count: int) -> list[Record]:
    """Questions that name an entity by another of its facts, or chain two facts."""
    out = []
    makers = [
        lambda o: (
            f"Who founded the organisation that is based in {o['hq']}?",
            f"The organisation based in {o['hq']} is the {o['org']}, founded by {o['founder']}.",
            o["founder"],
            [o["founder"], o["founder"].split()[-1]],
            o["doc"],
            "indirect",
        ),
        lambda o: (
            f"In which town was the founder of the {o['org']} born?",
            f"The {o['org']} was founded by {o['founder']}, who was born in {o['birthplace']}.",
            o["birthplace"],
            [o["birthplace"]],
            o["doc"],
            "two-hop",
        ),
        lambda o: (
            f"Where is the organisation founded by {o['founder']} based?",
            f"{o['founder']} founded the {o['org']}, which is based in {o['hq']}.",
            o["hq"],
            [o["hq"]],
            o["doc"],
            "indirect",
        ),
    ]
    event_makers = [
        lambda e: (
            f"Which organisation does the winner of the {e['event']} work at?",
            f"The {e['event']} was won by {e['winner']}, who works at the {e['org']}.",
            e["org"],
            [e["org"]],
            e["doc"],
            "two-hop",
        ),
        lambda e: (
            f"Who won the event held in {e['venue']}?",
            f"The event held in {e['venue']} was the {e['event']}, won by {e['winner']}.",
            e["winner"],
            [e["winner"], e["winner"].split()[-1]],
            e["doc"],
            "indirect",
        ),
        lambda e: (
            f"In which town is the employer of the {e['event']} winner based?",
            f"The {e['event']} was won by {e['winner']}, who works at the {e['org']}, based in {e['hq']}.",
            e["hq"],
            [e["hq"]],
            e["doc"] + " " + e["org_doc"],
            "two-hop",
        ),
    ]
    candidates = [m(o) for o in orgs for m in makers] + [m(e) for e in events for m in event_makers]
    rng.shuffle(candidates)
    for question, demo, answer, answers, context, kind in candidates[:count]:
        out.append(_row(question, demo, answer, answers, context, "ood", kind))
    return out


def _fact_row(fact: Fact, phrasing: str, demonstration: str, split: str) -> Record:
    """The record asking `fact` in `phrasing`, its passage as the context."""
    question = phrasing.format(s=fact.subject)
    return _row(question, demonstration, fact.answer, fact.answers, fact.passage, split, fact.relation)


def make(seed: int, size: int) -> TaskData:
    rng = random.Random(seed)
    n_eval = eval_size(size)
    facts, documents, orgs, events = build_world(rng, max(size, n_eval))
    rng.shuffle(facts)
    train, evaluation = [], []
    for i, fact in enumerate(facts[: max(size, n_eval)]):
        phrasings, demo = QUESTIONS[fact.relation]
        first, second = rng.sample(phrasings, 2)  # two different phrasings of the same fact
        demonstration = demo.format(s=fact.subject, o=fact.answer)
        demonstration = demonstration[0].upper() + demonstration[1:]
        if i < size:
            train.append(_fact_row(fact, first, demonstration, "train"))
        if i < n_eval:
            evaluation.append(_fact_row(fact, second, demonstration, "eval"))
    return TaskData(train=train, eval=evaluation, documents=documents, extra={"ood": _ood(rng, orgs, events, n_eval)})


SPEC = TaskSpec(
    name="knowledge",
    description="Facts about a fictional world (2026-2029) as documents and questions; out-of-distribution questions too.",
    metrics=(Metric("strict", "contains"), Metric("lenient", "contains", "answers")),
    make=make,
)
