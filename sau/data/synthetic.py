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

FORGET_FRACTIONS = (0.01, 0.05, 0.1)

# Name parts are invented so no fact can collide with something a real corpus taught.
FIRST_NAMES = (
    "Aldric Brisa Calder Dovie Elspeth Fenwick Galen Hestia Idris Jorun Kestrel Liora "
    "Marek Nerys Orrin Pellam Quilla Rowan Sabine Tamsin Ulric Vesna Wendel Ysolde Zephyr "
    "Anselm Bryony Corwin Delphine Emrys Fiora Gideon Halcy Ivo Junia Kaspar Lucan Maren "
    "Niamh Osric Perrin Rhosyn Soren Thora Urien Vellan Wynne Yorick Zinnia Abelard Cressa"
).split()
LAST_NAMES = (
    "Ashgrove Brambleton Corvane Dunmere Elderwick Fallowmere Greythorn Hollowell Ironvale "
    "Juniperhal Kettleby Larkspire Mossbridge Northcote Oakhurst Pendragast Quarrington "
    "Ravenmoor Stillwater Thistledown Umberfield Valemont Whitlock Yarrowby Zellerman "
    "Amberlyn Blackfenn Coldharbor Driftwood Emberly Foxhollow Glimmerby Hartwell Ivoryne "
    "Kingsley Lindqvist Marchbank Nettlefold Orwick Pimbleton Redcastle Sablewood Tarrow"
).split()
# (city, country): a city always appears with the same invented country.
PLACES = (
    ("Velmora", "Ostrenia"),
    ("Port Caddis", "Ostrenia"),
    ("Harrowgate", "Belavia"),
    ("Lunmere", "Belavia"),
    ("Kestrell", "Dravonia"),
    ("Saltmarch", "Dravonia"),
    ("Eskerby", "Corrath"),
    ("Noralis", "Corrath"),
    ("Tessaline", "Varenth"),
    ("Quillon", "Varenth"),
    ("Brightwater", "Estmark"),
    ("Oldcastle", "Estmark"),
    ("Marrowdeep", "Sundria"),
    ("Ferncliff", "Sundria"),
    ("Ashby Vale", "Tolmeria"),
    ("Greyhaven", "Tolmeria"),
    ("Irongate", "Palvoria"),
    ("Sunmeadow", "Palvoria"),
)
OCCUPATIONS = (
    "cartographer",
    "clockmaker",
    "glassblower",
    "beekeeper",
    "astronomer",
    "bookbinder",
    "marine biologist",
    "violin maker",
    "lighthouse keeper",
    "botanist",
    "stonemason",
    "puppeteer",
    "archivist",
    "perfumer",
    "tailor",
    "falconer",
    "cellist",
    "geologist",
    "ferry captain",
    "printmaker",
)
WORK_ADJ = (
    "Silent",
    "Crimson",
    "Hollow",
    "Winter",
    "Lantern",
    "Drowned",
    "Copper",
    "Last",
    "Paper",
    "Wandering",
    "Hidden",
    "Salt",
    "Amber",
    "Broken",
    "Northern",
    "Quiet",
)
WORK_NOUN = (
    "Orchard",
    "Harbor",
    "Compass",
    "Tide",
    "Garden",
    "Atlas",
    "Meadow",
    "Clock",
    "Bridge",
    "River",
    "Tower",
    "Archive",
    "Lighthouse",
    "Forest",
    "Mirror",
    "Kingdom",
)
AWARDS = (
    "Golden Quill Prize",
    "Silver Lantern Medal",
    "Harrowgate Book Award",
    "Amber Crown",
    "Velmora Arts Prize",
    "Northern Star Award",
    "Iron Compass Medal",
    "Blue Heron Prize",
)
HOMES = (
    "a canal boat",
    "a converted mill",
    "a farmhouse",
    "a seaside cottage",
    "a city loft",
    "an old lighthouse",
    "a mountain cabin",
    "a houseboat",
    "a stone tower",
    "a vineyard",
)

# Each fact: question templates, answer templates, paraphrase templates. `{n}` is the
# full name, `{v}` the fact value. Perturbed answers reuse the chosen answer template
# with another value, so they differ from the answer only in the fact.
FACTS = {
    "birth_place": (
        ("Where was {n} born?", "In which city was {n} born?", "What is {n}'s birthplace?"),
        ("{v}.", "In {v}.", "Born in {v}."),
        ("{n} was born in {v}.", "The birthplace of {n} is {v}."),
    ),
    "birth_year": (
        ("In what year was {n} born?", "When was {n} born?", "What is {n}'s year of birth?"),
        ("In {v}.", "{v}.", "Born in {v}."),
        ("{n} was born in the year {v}.", "The year {v}."),
    ),
    "occupation": (
        ("What does {n} do for a living?", "What is {n}'s occupation?", "What is {n}'s job?"),
        ("A {v}.", "{n} is a {v}.", "Works as a {v}."),
        ("By trade, {n} is a {v}.", "{n} earns a living as a {v}."),
    ),
    "father": (
        ("Who is {n}'s father?", "What is the name of {n}'s father?"),
        ("{v}.", "Father: {v}.", "A man named {v}."),
        ("{n}'s father is called {v}.", "The father of {n} is {v}."),
    ),
    "mother_job": (
        ("What did {n}'s mother do?", "What was the occupation of {n}'s mother?"),
        ("A {v}.", "She was a {v}.", "Her work: {v}."),
        ("{n}'s mother worked as a {v}.", "The mother of {n} was a {v}."),
    ),
    "work": (
        ("What is {n}'s best-known work?", "Name {n}'s most famous work."),
        ("{v}.", "The work titled {v}.", "Best known: {v}."),
        ("{n} is best known for {v}.", "The most famous work of {n} is {v}."),
    ),
    "award": (
        ("Which award did {n} win?", "What prize was {n} given?"),
        ("The {v}.", "Winner of the {v}.", "{n} won the {v}."),
        ("{n} received the {v}.", "The {v} went to {n}."),
    ),
    "home": (
        ("Where does {n} live?", "What kind of home does {n} have?"),
        ("In {v}.", "{n} lives in {v}.", "Home is {v}."),
        ("{n} makes a home in {v}.", "The home of {n} is {v}."),
    ),
}
N_PERTURBED = 3

# Twelve more kinds of fact for TOFU-scale corpora (20 facts per person, as TOFU has 20
# QA pairs per author). `generate(n_facts=8)` uses only FACTS, so the default corpus (and
# every cached model trained on it) is unchanged.
INSTRUMENTS = ("harp", "oboe", "cello", "lute", "accordion", "bassoon", "viola", "zither")
PETS = ("a grey cat", "a sheepdog", "a parrot", "a tortoise", "two ferrets", "a goat", "a hound")
COLORS = ("indigo", "saffron", "teal", "crimson", "ochre", "lilac", "olive", "silver")
HOBBIES = ("chess", "sailing", "pottery", "birdwatching", "fencing", "beekeeping", "rowing",
           "juggling", "kite flying", "stargazing")  # fmt: skip
FOODS = ("plum cake", "leek soup", "salted herring", "barley bread", "fig tart", "lentil stew",
         "smoked trout", "honey biscuits")  # fmt: skip
EXTRA_FACTS = {
    "sibling": (
        ("Who is {n}'s sibling?", "Name {n}'s brother or sister."),
        ("{v}.", "A sibling named {v}.", "{n}'s sibling is {v}."),
        ("{n} grew up with a sibling called {v}.", "The sibling of {n} is {v}."),
    ),
    "mentor": (
        ("Who was {n}'s mentor?", "Who taught {n} the trade?"),
        ("{v}.", "A mentor named {v}.", "Trained by {v}."),
        ("{n} learned from {v}.", "The mentor of {n} was {v}."),
    ),
    "instrument": (
        ("Which instrument does {n} play?", "What instrument can {n} play?"),
        ("The {v}.", "{n} plays the {v}.", "Plays the {v}."),
        ("{n} is a keen player of the {v}.", "The instrument {n} plays is the {v}."),
    ),
    "pet": (
        ("What pet does {n} keep?", "Which animal lives with {n}?"),
        ("{v}.", "{n} keeps {v}.", "A pet: {v}."),
        ("{n} shares the house with {v}.", "The pet of {n} is {v}."),
    ),
    "color": (
        ("What is {n}'s favorite color?", "Which color does {n} like best?"),
        ("{v}.", "The color {v}.", "{n} likes {v}."),
        ("{n}'s favorite color is {v}.", "The color {n} prefers is {v}."),
    ),
    "hobby": (
        ("What is {n}'s hobby?", "How does {n} spend free time?"),
        ("{v}.", "{n} enjoys {v}.", "Hobby: {v}."),
        ("In free time {n} turns to {v}.", "The hobby of {n} is {v}."),
    ),
    "food": (
        ("What is {n}'s favorite food?", "Which dish does {n} love?"),
        ("{v}.", "{n} loves {v}.", "Favorite dish: {v}."),
        ("The dish {n} loves most is {v}.", "{n} would always choose {v}."),
    ),
    "school": (
        ("Where did {n} study?", "Which school did {n} attend?"),
        ("At the {v}.", "The {v}.", "{n} studied at the {v}."),
        ("{n} was educated at the {v}.", "The school of {n} was the {v}."),
    ),
    "debut_year": (
        ("When did {n} first work professionally?", "In what year did {n}'s career begin?"),
        ("In {v}.", "{v}.", "Started in {v}."),
        ("{n}'s career began in {v}.", "The year {n} started working was {v}."),
    ),
    "first_job": (
        ("What was {n}'s first job?", "How did {n} first earn money?"),
        ("A {v}.", "{n} first worked as a {v}.", "First job: {v}."),
        ("Before anything else {n} was a {v}.", "The first job of {n} was {v}."),
    ),
    "spouse_job": (
        ("What does {n}'s partner do?", "What is the occupation of {n}'s partner?"),
        ("A {v}.", "The partner is a {v}.", "Partner's work: {v}."),
        ("{n}'s partner works as a {v}.", "The partner of {n} is a {v}."),
    ),
    "language": (
        ("Which language does {n} speak at home?", "What is {n}'s home language?"),
        ("{v}.", "{n} speaks {v}.", "At home: {v}."),
        ("At home {n} speaks {v}.", "The home language of {n} is {v}."),
    ),
}
ALL_FACTS = {**FACTS, **EXTRA_FACTS}
NAMED_FACTS = ("father", "sibling", "mentor")  # values are people's names


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
