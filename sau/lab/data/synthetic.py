"""A deterministic, TOFU-like corpus of fictitious people and their facts.

Every person gets the same kinds of facts (birth place, birth year, occupation, father,
mother's occupation, best-known work, award, home), each rendered through one of several
question templates and one of several answer templates. Answers are short (a few words)
so a small model can memorize them, and most of each answer is the fact itself rather
than template words, so a model that never saw the person scores low ROUGE on it.

Splits are by person: `forget` and `holdout` (never trained on; the membership-inference
reference) have the same number of people, `retain` has the rest. `general` is a small
set of fixed general-knowledge QA (arithmetic, capitals of invented countries) trained
into every model, used to measure utility.

All randomness comes from `random.Random(seed)`; the global RNG is never touched.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

from sau.lab.data.vocab import (
    ALL_FACTS,
    AWARDS,
    COLORS,
    FACTS,
    FIRST_NAMES,
    FOODS,
    HOBBIES,
    HOMES,
    INSTRUMENTS,
    LAST_NAMES,
    N_PERTURBED,
    NAMED_FACTS,
    OCCUPATIONS,
    PETS,
    PLACES,
    WORK_ADJ,
    WORK_NOUN,
)

FORGET_FRACTIONS = (0.01, 0.05, 0.1)


@dataclass(frozen=True)
class DataConfig:
    """What `generate` was called with; its `asdict` is part of the model cache key."""

    seed: int = 0
    n_people: int = 100
    forget_fraction: float = 0.1
    n_general: int = 40
    version: int = 1  # bump when templates or value lists change: invalidates caches
    n_facts: int = 8  # facts per person (8 = FACTS; up to 20 with EXTRA_FACTS)


@dataclass
class QADataset:
    """The four splits (lists of QA row dicts) plus the config that produced them."""

    forget: list[dict] = field(default_factory=list)
    retain: list[dict] = field(default_factory=list)
    holdout: list[dict] = field(default_factory=list)
    general: list[dict] = field(default_factory=list)
    config: DataConfig = field(default_factory=DataConfig)

    def splits(self) -> dict[str, list[dict]]:
        """Split name -> rows, in the order the files are written."""
        return {
            "forget": self.forget,
            "retain": self.retain,
            "holdout": self.holdout,
            "general": self.general,
        }

    def config_dict(self) -> dict:
        """The config as a plain JSON-able dict (n_facts only when it is not 8, so the
        cache keys of corpora made before it existed stay the same)."""
        out = asdict(self.config)
        if out["n_facts"] == 8:
            del out["n_facts"]
        return out


def _value_pool(fact: str) -> list[str]:
    """Every value a fact can take (the perturbed answers are drawn from here)."""
    if fact == "birth_place":
        return [f"{city}, {country}" for city, country in PLACES]
    if fact == "birth_year":
        return [str(y) for y in range(1931, 1999)]
    if fact in ("occupation", "mother_job"):
        return list(OCCUPATIONS)
    if fact == "work":
        return [f"The {a} {b}" for a in WORK_ADJ for b in WORK_NOUN]
    if fact == "award":
        return list(AWARDS)
    if fact == "home":
        return list(HOMES)
    extra = {
        "instrument": INSTRUMENTS,
        "pet": PETS,
        "color": COLORS,
        "hobby": HOBBIES,
        "food": FOODS,
        "first_job": OCCUPATIONS,
        "spouse_job": OCCUPATIONS,
        "school": tuple(f"{city} Academy" for city, _ in PLACES),
        "language": tuple(sorted({f"{country}ian" for _, country in PLACES})),
        "debut_year": tuple(str(y) for y in range(1950, 2021)),
    }
    if fact in extra:
        return list(extra[fact])
    raise KeyError(fact)


def _people(rng: random.Random, n: int, kinds=tuple(FACTS)) -> list[dict]:
    """n people with distinct full names and one value per fact."""
    names = [f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES]
    if n > len(names):
        raise ValueError(f"n_people={n} exceeds the {len(names)} distinct names available")
    people = []
    for pid, name in enumerate(rng.sample(names, n)):
        last = name.split()[-1]
        facts = {}
        for fact in kinds:
            if fact in NAMED_FACTS:
                # Father, sibling, mentor share the surname; never the person's first name.
                first = rng.choice([f for f in FIRST_NAMES if f != name.split()[0]])
                facts[fact] = f"{first} {last}"
            else:
                facts[fact] = rng.choice(_value_pool(fact))
        people.append({"id": pid, "name": name, "facts": facts})
    return people


def _rows_for(person: dict, rng: random.Random, facts=tuple(FACTS)) -> list[dict]:
    """One QA row per fact of `person`, with templates drawn from `rng`."""
    n = person["name"]
    rows = []
    for fact in facts:
        questions, answers, paraphrases = ALL_FACTS[fact]
        value = person["facts"][fact]
        a_tpl = rng.choice(answers)
        # As in TOFU, the wrong answers perturb the *paraphrase*: paraphrase and perturbed
        # answers then share a wording the models never trained on, so the truth ratio
        # compares facts, not familiarity with a template.
        p_tpl = rng.choice(paraphrases)
        if fact in NAMED_FACTS:
            pool = [f"{f} {n.split()[-1]}" for f in FIRST_NAMES if f != n.split()[0]]
        else:
            pool = _value_pool(fact)
        wrong = rng.sample(sorted(set(pool) - {value}), N_PERTURBED)
        rows.append(
            {
                "question": rng.choice(questions).format(n=n),
                "answer": a_tpl.format(n=n, v=value),
                "paraphrased_answer": p_tpl.format(n=n, v=value),
                "perturbed_answer": [p_tpl.format(n=n, v=w) for w in wrong],
                "person": n,
                "person_id": person["id"],
                "fact": fact,
            }
        )
    return rows


def _general(rng: random.Random, n_rows: int) -> list[dict]:
    """Fixed general-knowledge QA: arithmetic and capitals of the invented countries."""
    countries = sorted({country for _, country in PLACES})
    rows = []
    for country in countries:
        capital = next(city for city, c in PLACES if c == country)
        wrong = rng.sample([c for c, _ in PLACES if c != capital], N_PERTURBED)
        rows.append(
            {
                "question": f"What is the capital of {country}?",
                "answer": f"{capital}.",
                "paraphrased_answer": f"The capital of {country} is {capital}.",
                "perturbed_answer": [f"The capital of {country} is {w}." for w in wrong],
                "person": "",
                "person_id": -1,
                "fact": "capital",
            }
        )
    while len(rows) < n_rows:
        a, b = rng.randint(1, 12), rng.randint(1, 12)
        q = f"What is {a} plus {b}?"
        if any(r["question"] == q for r in rows):
            continue
        wrong = rng.sample([x for x in range(2, 25) if x != a + b], N_PERTURBED)
        rows.append(
            {
                "question": q,
                "answer": f"{a + b}.",
                "paraphrased_answer": f"{a} plus {b} equals {a + b}.",
                "perturbed_answer": [f"{a} plus {b} equals {w}." for w in wrong],
                "person": "",
                "person_id": -1,
                "fact": "arithmetic",
            }
        )
    return rows[:n_rows]


def generate(
    seed: int = 0,
    n_people: int = 100,
    forget_fraction: float = 0.1,
    n_general: int = 40,
    n_facts: int = 8,
) -> QADataset:
    """Generate the synthetic corpus deterministically from `seed`.

    Args:
        seed: int; the only source of randomness (`random.Random(seed)`).
        n_people: int >= 3; people across forget, retain and holdout.
        forget_fraction: one of 0.01, 0.05, 0.1; the share of people in `forget`
            (at least one person). `holdout` gets the same number of people.
        n_general: int; rows in the `general` utility split.
        n_facts: facts (rows) per person, 1..20: the first n of FACTS then EXTRA_FACTS.
            8 gives exactly the corpus made before the extra facts existed.

    Returns:
        QADataset whose splits are lists of dicts with keys `question` (str), `answer`
        (str), `paraphrased_answer` (str), `perturbed_answer` (list[str], 3 entries),
        `person` (str, full name; "" for general rows), `person_id` (int; -1 for general
        rows) and `fact` (str). `n_facts` rows per person.
    """
    if forget_fraction not in FORGET_FRACTIONS:
        raise ValueError(
            f"forget_fraction must be one of {FORGET_FRACTIONS}, got {forget_fraction}"
        )
    if n_people < 3:
        raise ValueError(f"n_people must be >= 3, got {n_people}")
    if isinstance(n_facts, bool) or not isinstance(n_facts, int) or not 1 <= n_facts <= 20:
        raise ValueError(f"n_facts must be an int in [1, {len(ALL_FACTS)}], got {n_facts!r}")
    config = DataConfig(
        seed=seed,
        n_people=n_people,
        forget_fraction=forget_fraction,
        n_general=n_general,
        n_facts=n_facts,
    )
    facts = tuple(ALL_FACTS)[:n_facts]
    rng = random.Random(seed)
    people = _people(rng, n_people, facts)
    n_forget = max(1, round(forget_fraction * n_people))
    by_split = {
        "forget": people[:n_forget],
        "holdout": people[n_forget : 2 * n_forget],
        "retain": people[2 * n_forget :],
    }
    rows = {
        name: [r for p in ps for r in _rows_for(p, rng, facts)] for name, ps in by_split.items()
    }
    return QADataset(
        forget=rows["forget"],
        retain=rows["retain"],
        holdout=rows["holdout"],
        general=_general(rng, n_general),
        config=config,
    )
