"""`science`: multiple-choice chemistry questions in the paper's science format.

Like the paper's science data (SciKnowEval chemistry), a system prompt asks for
`<reasoning>...</reasoning><answer>X</answer>`; the user turn is a question with options A-D.
The questions need arithmetic on a molecular formula (molar mass, atom counts, heaviest
molecule), which a 135M model cannot do unaided, while the demonstration gives a short
worked reasoning and the letter, which it can copy. Graded with `choice_tag`.
"""

from __future__ import annotations

import random

from selfdistill.data.records import Record, record_from_row
from selfdistill.tasks.base import Metric, TaskData, TaskSpec, eval_size

SYSTEM_PROMPT = (
    "Given a question and four options, please select the right answer. Respond in the following format:\n"
    "<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
    "For the answer, only output the letter (A, B, C, or D)."
)
LETTERS = "ABCD"
MASSES = {"C": 12.011, "H": 1.008, "O": 15.999, "N": 14.007, "S": 32.06, "Cl": 35.45}
NAMES = {"C": "carbon", "H": "hydrogen", "O": "oxygen", "N": "nitrogen", "S": "sulfur", "Cl": "chlorine"}


def _formula(rng: random.Random) -> dict[str, int]:
    counts = {"C": rng.randint(1, 9), "H": rng.randint(2, 18)}
    for element in rng.sample(["O", "N", "S", "Cl"], rng.randint(1, 2)):
        counts[element] = rng.randint(1, 4)
    return counts


def formula_text(counts: dict[str, int]) -> str:
    return "".join(e + (str(n) if n > 1 else "") for e, n in counts.items())


def molar_mass(counts: dict[str, int]) -> float:
    return sum(MASSES[e] * n for e, n in counts.items())


def _options(rng: random.Random, correct: str, wrong: list[str]) -> tuple[list[str], str]:
    letter_index = rng.randrange(4)
    options = wrong[:3]
    options.insert(letter_index, correct)
    return options, LETTERS[letter_index]


def _molar_mass_item(rng: random.Random):
    counts = _formula(rng)
    mass = molar_mass(counts)
    shifts = rng.sample([-32.0, -16.0, -14.0, -12.0, 12.0, 14.0, 16.0, 28.0, 35.5], 3)
    options, letter = _options(rng, f"{mass:.2f}", [f"{mass + s:.2f}" for s in shifts])
    formula = formula_text(counts)
    question = rng.choice(
        [
            "What is the molar mass (g/mol) of {f}?",
            "Calculate the molar weight in g/mol of the molecule {f}.",
            "A compound has the formula {f}. What is its molar mass in g/mol?",
        ]
    ).format(f=formula)
    terms = " + ".join(f"{n}x{MASSES[e]}" for e, n in counts.items())
    reasoning = f"{formula}: {terms} = {mass:.2f} g/mol."
    return question, options, letter, reasoning


def _atom_count_item(rng: random.Random):
    counts = _formula(rng)
    element = rng.choice(list(counts))
    n = counts[element]
    wrong = rng.sample([k for k in range(1, 21) if k != n], 3)
    options, letter = _options(rng, str(n), [str(k) for k in wrong])
    formula = formula_text(counts)
    question = rng.choice(
        [
            "How many {name} atoms are in one molecule of {f}?",
            "Count the {name} atoms in the formula {f}.",
            "One molecule of {f} contains how many atoms of {name}?",
        ]
    ).format(name=NAMES[element], f=formula)
    reasoning = f"In {formula} the subscript of {element} is {n}, so there are {n} {NAMES[element]} atoms."
    return question, options, letter, reasoning


def _heaviest_item(rng: random.Random):
    formulas = []
    while len(formulas) < 4:
        counts = _formula(rng)
        if all(abs(molar_mass(counts) - molar_mass(other)) > 1.0 for other in formulas):
            formulas.append(counts)
    heaviest = max(formulas, key=molar_mass)
    rest = [f for f in formulas if f is not heaviest]
    options, letter = _options(rng, formula_text(heaviest), [formula_text(f) for f in rest])
    question = rng.choice(
        [
            "Which of these molecules has the largest molar mass?",
            "Which molecule is the heaviest per mole?",
            "Select the compound with the highest molar weight.",
        ]
    )
    reasoning = f"{formula_text(heaviest)} has the largest molar mass, {molar_mass(heaviest):.2f} g/mol."
    return question, options, letter, reasoning


ITEM_KINDS = {"molar_mass": _molar_mass_item, "atom_count": _atom_count_item, "heaviest": _heaviest_item}


def _record(rng: random.Random, split: str, seen: set[str]) -> Record:
    while True:
        kind = rng.choice(list(ITEM_KINDS))
        question, options, letter, reasoning = ITEM_KINDS[kind](rng)
        text = question + "\n\n" + "\n".join(f"{LETTERS[i]}: {o}" for i, o in enumerate(options))
        if text not in seen:  # every question appears once across all splits
            seen.add(text)
            break
    demonstration = f"<reasoning>\n{reasoning} The answer is {letter}.\n</reasoning>\n<answer>\n{letter}\n</answer>"
    row = {
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}],
        "demonstration": demonstration,
        "answer": letter,
        "task": "science",
        "split": split,
        "kind": kind,
    }
    return record_from_row(row, f"science {split} item {len(seen)}")


def make(seed: int, size: int) -> TaskData:
    rng = random.Random(seed)
    seen: set[str] = set()
    train = [_record(rng, "train", seen) for _ in range(size)]
    evaluation = [_record(rng, "eval", seen) for _ in range(eval_size(size))]
    return TaskData(train=train, eval=evaluation)


SPEC = TaskSpec(
    name="science",
    description="Multiple-choice chemistry arithmetic in the paper's science format (<reasoning>/<answer> tags).",
    metrics=(Metric("accuracy", "choice_tag"),),
    make=make,
)
