"""The vocabulary of the synthetic corpus (sau.lab.data.synthetic): invented name parts,
places, occupations and works, and each kind of fact's question, answer and paraphrase
templates. Changing any of it changes the corpus: bump DataConfig.version.
"""

from __future__ import annotations

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
