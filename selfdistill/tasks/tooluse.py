"""`tooluse`: calls to fictional APIs in the paper's ToolAlpaca format.

The prompt documents one fictional API (two functions) in the paper's layout and ends with a
user request whose arguments can be read from the request itself; the demonstration is the
paper's "Thought: ... / Action: ... / Action Input: {...}" answer. Prompts are kept short
(~150 tokens): the embedded 135M model follows a demonstrated call only in short prompts
(as teacher, with the plain template, it got 71% of 24 short synthetic calls right and 5% of the
paper's ~740-token tool-use prompts). Training and evaluation use disjoint API names, so no evaluation prompt
is a training prompt.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from selfdistill.data.records import Record, record_from_row
from selfdistill.tasks.base import Metric, TaskData, TaskSpec, eval_size

# Values a request can carry; each argument draws from one pool.
POOLS = {
    "city": [
        "Lisbon",
        "Oslo",
        "Nairobi",
        "Lima",
        "Hanoi",
        "Quito",
        "Tallinn",
        "Perth",
        "Accra",
        "Bergen",
        "Dakar",
        "Kyoto",
        "Porto",
        "Tunis",
        "Leeds",
        "Cusco",
    ],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "author": ["Mara Quinn", "Tobias Reed", "Ines Calder", "Omar Haddad", "Lena Ford", "Yuki Sato"],
    "genre": ["mystery", "poetry", "history", "fantasy", "travel", "cooking"],
    "ingredient": ["lentils", "salmon", "spinach", "mango", "tofu", "mushrooms", "chickpeas", "rice"],
    "animal": ["otter", "lynx", "heron", "gecko", "badger", "falcon", "tapir", "koala"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange"],
    "song": ["Blue Harbor", "Night Train", "Paper Moon", "Silver Road", "Glass River", "Quiet Storm"],
    "number": [str(n) for n in range(2, 13)],
    "team": ["Falcons", "Rovers", "Comets", "Pilots", "Tigers", "Wolves"],
}


@dataclass(frozen=True)
class Function:
    name: str
    doc: str
    params: tuple[tuple[str, str, str], ...]  # (argument, pool, description)
    requests: tuple[str, ...]  # user requests with {argument} slots
    thought: str  # the demonstration's reasoning line, with the same slots


@dataclass(frozen=True)
class Domain:
    description: str
    functions: tuple[Function, ...]


DOMAINS = (
    Domain(
        "Weather forecasts for cities.",
        (
            Function(
                "getForecast",
                "Get the weather forecast for a city on a given day.",
                (("city", "city", "The city name."), ("day", "day", "The day of the week.")),
                (
                    "What will the weather be like in {city} on {day}?",
                    "Will it rain in {city} on {day}?",
                    "Can you check the forecast for {city} for {day}?",
                    "I'm going to {city} on {day}, how warm will it be?",
                ),
                "I need the forecast for {city} on {day}.",
            ),
            Function(
                "getAirQuality",
                "Get the current air quality index of a city.",
                (("city", "city", "The city name."),),
                (
                    "How clean is the air in {city} right now?",
                    "What's the air quality in {city}?",
                    "Is the air in {city} safe for a run today?",
                ),
                "I need the air quality of {city}.",
            ),
        ),
    ),
    Domain(
        "Find books and authors.",
        (
            Function(
                "searchBooks",
                "Search books by author and genre.",
                (("author", "author", "The author's full name."), ("genre", "genre", "The genre of the book.")),
                (
                    "Find me a {genre} book by {author}.",
                    "Does {author} have any {genre} books?",
                    "I'd like to read some {genre} written by {author}.",
                ),
                "I should search for {genre} books by {author}.",
            ),
            Function(
                "getAuthorBio",
                "Get a short biography of an author.",
                (("author", "author", "The author's full name."),),
                ("Who is {author}?", "Tell me about the writer {author}.", "Give me a short bio of {author}."),
                "I need the biography of {author}.",
            ),
        ),
    ),
    Domain(
        "Recipes and cooking ideas.",
        (
            Function(
                "findRecipes",
                "Find recipes that use an ingredient.",
                (("ingredient", "ingredient", "The main ingredient."), ("servings", "number", "Number of servings.")),
                (
                    "What can I cook with {ingredient} for {servings} people?",
                    "Give me a recipe using {ingredient} that serves {servings}.",
                    "I have {ingredient}, any dinner ideas for {servings} people?",
                ),
                "I should look for {ingredient} recipes for {servings} servings.",
            ),
            Function(
                "getNutrition",
                "Get the nutrition facts of an ingredient.",
                (("ingredient", "ingredient", "The ingredient name."),),
                (
                    "How healthy is {ingredient}?",
                    "What are the nutrition facts of {ingredient}?",
                    "How many calories are in {ingredient}?",
                ),
                "I need the nutrition facts of {ingredient}.",
            ),
        ),
    ),
    Domain(
        "Facts and pictures of animals.",
        (
            Function(
                "getAnimalFacts",
                "Get facts about an animal.",
                (("animal", "animal", "The animal name."), ("limit", "number", "How many facts to return.")),
                (
                    "Tell me {limit} facts about the {animal}.",
                    "Give me {limit} fun facts on the {animal}.",
                    "I want to learn {limit} things about the {animal}.",
                ),
                "I should get {limit} facts about the {animal}.",
            ),
            Function(
                "getAnimalImage",
                "Get a picture of an animal.",
                (("animal", "animal", "The animal name."),),
                (
                    "Show me a picture of a {animal}.",
                    "Can I see a photo of a {animal}?",
                    "I'd love an image of a {animal}.",
                ),
                "I need a picture of a {animal}.",
            ),
        ),
    ),
    Domain(
        "Music playlists and songs.",
        (
            Function(
                "playSong",
                "Play a song by its title.",
                (("title", "song", "The song title."),),
                ("Play {title} for me.", "Put on the song {title}, please.", "I want to hear {title}."),
                "I should play the song {title}.",
            ),
            Function(
                "createPlaylist",
                "Create a playlist in a color theme with a number of songs.",
                (("theme", "color", "The color theme."), ("size", "number", "Number of songs.")),
                (
                    "Make me a {theme} playlist with {size} songs.",
                    "Create a {size}-song playlist, theme {theme}.",
                    "I need a new {theme} themed playlist of {size} songs.",
                ),
                "I should create a {theme} playlist with {size} songs.",
            ),
        ),
    ),
    Domain(
        "Sports scores and schedules.",
        (
            Function(
                "getNextMatch",
                "Get the next match of a team in a city.",
                (("team", "team", "The team name."), ("city", "city", "The city of the team.")),
                (
                    "When do the {city} {team} play next?",
                    "What's the next game of the {team} from {city}?",
                    "Tell me when the {city} {team} have their next match.",
                ),
                "I need the next match of the {city} {team}.",
            ),
            Function(
                "getStandings",
                "Get the league table on a given day.",
                (("day", "day", "The day of the week."),),
                (
                    "Show me the league table as of {day}.",
                    "What were the standings on {day}?",
                    "How did the league table look on {day}?",
                ),
                "I need the standings on {day}.",
            ),
        ),
    ),
)

# Fictional API names: a brand part and a suffix. Training and evaluation take disjoint brands.
BRANDS = [
    "Zorb",
    "Quill",
    "Marlo",
    "Fenwick",
    "Tavi",
    "Brisk",
    "Nimbo",
    "Kestra",
    "Olvar",
    "Pimble",
    "Rusk",
    "Sable",
    "Trello",
    "Umbra",
    "Vexa",
    "Wren",
    "Yarrow",
    "Zephy",
    "Ardo",
    "Bexley",
    "Corvo",
    "Delmi",
    "Elbo",
    "Fargo",
    "Glim",
    "Hollo",
    "Istra",
    "Jando",
    "Kiri",
    "Lumo",
]
SUFFIXES = ["Hub", "API", "ly", "Base", "Go", "Net"]

HEADER = "Your task is to answer the user's question using available tools.\n"
# The paper's prompt explains the answer format in a block before the question; on the 135M model
# that block made the teacher echo the prompt (15-25% teacher accuracy). A one-line reminder after
# the question, with no placeholder to copy, keeps the prompt short (~110 tokens).
QUESTION = "Question: "
REMINDER = "\nReply in the format Thought / Action / Action Input, with the arguments as JSON."
# A teacher template for this task: "in the same format" keeps a small model on the demonstrated
# format (paper template 25%, plain 17%, this one 33% in a first 12-item measurement).
SAME_FORMAT_TEMPLATE = "{question}\n\nExample answer:\n{demonstration}\n\nNow answer in the same format."


def documentation(api: str, domain: Domain) -> str:
    lines = [f"Name: {api}", f"Description: {domain.description}", "Documentation:"]
    for fn in domain.functions:
        params = {arg: "string" for arg, _pool, _desc in fn.params}
        lines.append(f"{fn.name}: {fn.doc} Parameters: {json.dumps(params)}")
    return "\n".join(lines) + "\n\n"


def _call(rng: random.Random, fn: Function) -> tuple[str, str, str]:
    """(request, demonstration, JSON arguments) of one call of `fn` with random argument values."""
    values = {arg: rng.choice(POOLS[pool]) for arg, pool, _desc in fn.params}
    arguments = json.dumps(values)
    demonstration = f"Thought: {fn.thought.format(**values)}\nAction: {fn.name}\nAction Input: {arguments}"
    return rng.choice(fn.requests).format(**values), demonstration, arguments


def format_hint(rng: random.Random, domain: Domain) -> str:
    """A worked call for a request to another domain's API: it shows the answer format, not the answer."""
    other = rng.choice([d for d in DOMAINS if d is not domain])
    request, demonstration, _ = _call(rng, rng.choice(other.functions))
    return f"Example of the format, for a different API and request:\nQuestion: {request}\n{demonstration}\n\n"


def _record(rng: random.Random, api: str, domain: Domain, split: str, hinted: bool = False) -> Record:
    fn = rng.choice(domain.functions)
    request, demonstration, arguments = _call(rng, fn)
    hint = format_hint(rng, domain) if hinted else ""
    row = {
        "prompt": HEADER + documentation(api, domain) + hint + QUESTION + request + REMINDER,
        "demonstration": demonstration,
        "golden_answer": [{"Action": fn.name, "Action_Input": arguments}],
        "task": "tooluse_hinted" if hinted else "tooluse",
        "split": split,
        "api": api,
        "instruction": request,
    }
    return record_from_row(row, f"tooluse {split} {api}")


def make(seed: int, size: int, hinted: bool = False) -> TaskData:
    rng = random.Random(seed)
    brands = BRANDS[:]
    rng.shuffle(brands)
    # Evaluation APIs take their brands from a held-out quarter of the brand list, so no
    # evaluation API name (and so no evaluation prompt) ever appears in training.
    held_out = set(brands[: len(brands) // 4])
    apis = [(brand, brand + suffix, domain) for brand in BRANDS for suffix in SUFFIXES for domain in DOMAINS]
    rng.shuffle(apis)
    train_apis = [(name, domain) for brand, name, domain in apis if brand not in held_out]
    eval_apis = [(name, domain) for brand, name, domain in apis if brand in held_out]
    n_eval = eval_size(size)
    train = [_record(rng, *train_apis[i % len(train_apis)], "train", hinted) for i in range(size)]
    evaluation = [_record(rng, *eval_apis[i % len(eval_apis)], "eval", hinted) for i in range(n_eval)]
    return TaskData(train=train, eval=evaluation)


SPEC = TaskSpec(
    name="tooluse",
    description="Calls to fictional APIs in the paper's ToolAlpaca format (Thought / Action / Action Input).",
    metrics=(Metric("accuracy", "toolalpaca"), Metric("partial", "toolalpaca_partial")),
    make=make,
    teacher_template=SAME_FORMAT_TEMPLATE,
)

# The same task with a worked call for another API in every prompt (student and teacher alike).
# The model without a demonstration then already writes the format part of the time, so its own
# samples - which on-policy methods learn from - start closer to the answer: the setting where
# the paper expects SDFT to work (it refines what the model already does) rather than the one
# where generation must change from free prose to a call.
HINTED_SPEC = TaskSpec(
    name="tooluse_hinted",
    description="tooluse with a worked call for a different API in the prompt (a format hint, not the answer).",
    metrics=(Metric("accuracy", "toolalpaca"), Metric("partial", "toolalpaca_partial")),
    make=lambda seed, size: make(seed, size, hinted=True),
    teacher_template=SAME_FORMAT_TEMPLATE,
)
