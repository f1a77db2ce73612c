"""Deterministic TOFU-shaped data: fictitious people and general-knowledge probes.

Every person has an invented, pronounceable name and a set of invented attribute
values (city, occupation, parents' names, ...) plus a few numbers.  Each attribute
becomes one question/answer pair whose answer is essentially the value itself
(``"Trelmont."``), so the per-token probability of an answer measures whether the
fact was memorised rather than how well a template sentence is modelled.

Paraphrases and perturbed (wrong) answers share one shape per item
(``"The city of Trelmont."`` vs ``"The city of Quessary."``) so the truth ratio
compares like with like.  Everything is a pure function of the seed: only
:class:`random.Random` instances are used, never the global random state or
``hash()`` of strings.

With ``domains = D >= 1`` (:func:`generate_tofu`) the clients are non-IID: client
``c`` belongs to domain ``c % D`` and the people of a domain draw every attribute
from a small pool of values of their own domain, so they resemble each other and
differ from the people of other domains.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from fed_unlearn.types import QAItem

#: Number of perturbed (wrong) answers attached to every item.
NUM_PERTURBED = 3

# --------------------------------------------------------------------------- words

_ONSETS = (
    "b", "br", "ch", "d", "dr", "f", "fl", "g", "gr", "h", "k", "kr", "l", "m",
    "n", "p", "pr", "qu", "r", "s", "sh", "st", "t", "th", "tr", "v", "w", "z",
)  # fmt: skip
_MID_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "a", "e", "ai", "ei", "ou")
_INNER_CODAS = ("", "", "", "", "l", "n", "r", "s")
_FINAL_CODAS = ("", "", "l", "n", "r", "s", "m", "th", "nd", "rn", "st", "x", "ck")
_HARD_CODAS = ("l", "n", "r", "s", "m", "th", "nd", "rn", "st", "x", "ck", "sk")


def _syllable(
    rng: random.Random, onsets: tuple[str, ...], codas: tuple[str, ...]
) -> str:
    onset = rng.choice(onsets)
    vowel = rng.choice(_VOWELS)
    while onset == "qu" and vowel[0] == "u":
        vowel = rng.choice(_VOWELS)
    return onset + vowel + rng.choice(codas)


def _word(rng: random.Random, syllables: int, hard_end: bool = False) -> str:
    """Return a lower-case pronounceable pseudo-word of ``syllables`` syllables."""
    parts = []
    for i in range(syllables):
        last = i == syllables - 1
        codas = (_HARD_CODAS if hard_end else _FINAL_CODAS) if last else _INNER_CODAS
        onsets = _ONSETS if i == 0 or parts[-1][-1] in "aeiou" else _MID_ONSETS
        parts.append(_syllable(rng, onsets, codas))
    return "".join(parts)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ------------------------------------------------------------------ value makers


def _first_name(rng: random.Random) -> str:
    return _cap(_word(rng, rng.choice((2, 2, 3))))


def _surname(rng: random.Random) -> str:
    return _cap(_word(rng, rng.choice((2, 3, 3))))


def _city(rng: random.Random) -> str:
    suffix = rng.choice(("", "", "mont", "ford", "holm", "bury", "wick", "dale"))
    return _cap(_word(rng, 1 if suffix else 2, hard_end=bool(suffix)) + suffix)


def _country(rng: random.Random) -> str:
    suffix = rng.choice(("ia", "ania", "ar", "land", "essa", "ora"))
    return _cap(_word(rng, 2, hard_end=True) + suffix)


def _year(rng: random.Random) -> str:
    return str(rng.randint(1921, 1999))


def _num_books(rng: random.Random) -> str:
    return str(rng.randint(2, 48))


def _occupation(rng: random.Random) -> str:
    suffix = rng.choice(
        ("wright", "smith", "monger", "keeper", "binder", "weaver", "crafter", "warden")
    )
    return _word(rng, rng.choice((1, 2)), hard_end=True) + suffix


def _genre(rng: random.Random) -> str:
    noun = rng.choice(("verse", "fables", "sagas", "chronicles", "romances", "elegies"))
    return f"{_cap(_word(rng, 2, hard_end=True))}ic {noun}"


def _title(rng: random.Random) -> str:
    return f"{_cap(_word(rng, rng.choice((2, 3))))} {_cap(_word(rng, 2))}"


def _award(rng: random.Random) -> str:
    noun = rng.choice(("Prize", "Medal", "Award", "Laurel"))
    return f"{_cap(_word(rng, 2))} {noun}"


def _lower_word(rng: random.Random) -> str:
    return _word(rng, 2, hard_end=rng.random() < 0.5)


def _school(rng: random.Random) -> str:
    noun = rng.choice(("University", "Academy", "College", "Institute"))
    return f"{_cap(_word(rng, 2))} {noun}"


@dataclass(frozen=True)
class _Attribute:
    key: str
    make: Callable[[random.Random], str]
    questions: tuple[str, ...]  # ``{name}`` is the person's full name
    paraphrases: tuple[str, ...]  # ``{v}`` is the value
    numeric: bool = False  # small value space: values need not be unique


_ATTRIBUTES: tuple[_Attribute, ...] = (
    _Attribute(
        "birth_city",
        _city,
        (
            "In which city was {name} born?",
            "What is the birthplace of {name}?",
            "Which city is {name} originally from?",
        ),
        ("The city of {v}.", "It is {v}."),
    ),
    _Attribute(
        "birth_year",
        _year,
        ("In which year was {name} born?", "What is the birth year of {name}?"),
        ("In the year {v}.", "The year {v}."),
        numeric=True,
    ),
    _Attribute(
        "home_country",
        _country,
        ("Which country does {name} come from?", "What is {name}'s home country?"),
        ("The country of {v}.", "It is {v}."),
    ),
    _Attribute(
        "occupation",
        _occupation,
        ("What is {name}'s occupation?", "What does {name} do for a living?"),
        ("The trade of {v}.", "The job of {v}."),
    ),
    _Attribute(
        "father_name",
        _first_name,
        (
            "What is the first name of {name}'s father?",
            "What is {name}'s father called?",
        ),
        ("He is called {v}.", "The father is {v}."),
    ),
    _Attribute(
        "mother_name",
        _first_name,
        (
            "What is the first name of {name}'s mother?",
            "What is {name}'s mother called?",
        ),
        ("She is called {v}.", "The mother is {v}."),
    ),
    _Attribute(
        "spouse_name",
        _first_name,
        ("What is the first name of {name}'s spouse?", "Whom did {name} marry?"),
        ("The spouse is {v}.", "Married to {v}."),
    ),
    _Attribute(
        "genre",
        _genre,
        ("In which genre does {name} write?", "What kind of works does {name} write?"),
        ("The genre of {v}.", "Mostly {v}."),
    ),
    _Attribute(
        "num_books",
        _num_books,
        (
            "How many books has {name} published?",
            "How many books has {name} written?",
        ),
        ("A total of {v} books.", "{v} books in all."),
        numeric=True,
    ),
    _Attribute(
        "debut_title",
        _title,
        ("What is the title of {name}'s first book?", "What was {name}'s debut book?"),
        ("The book {v}.", "It was {v}."),
    ),
    _Attribute(
        "award",
        _award,
        ("Which award has {name} won?", "What prize was awarded to {name}?"),
        ("The {v}.", "Winner of the {v}."),
    ),
    _Attribute(
        "favourite_colour",
        _lower_word,
        ("What is {name}'s favourite colour?", "Which colour does {name} like best?"),
        ("The colour {v}.", "It is {v}."),
    ),
    _Attribute(
        "pet_name",
        _first_name,
        ("What is the name of {name}'s pet?", "What is {name}'s pet called?"),
        ("The pet is called {v}.", "A pet named {v}."),
    ),
    _Attribute(
        "instrument",
        _lower_word,
        (
            "Which musical instrument does {name} play?",
            "What instrument does {name} play?",
        ),
        ("The instrument called {v}.", "It is the {v}."),
    ),
    _Attribute(
        "favourite_food",
        _lower_word,
        ("What is {name}'s favourite food?", "Which dish does {name} like best?"),
        ("A dish called {v}.", "It is {v}."),
    ),
    _Attribute(
        "alma_mater",
        _school,
        ("Where did {name} study?", "Which school did {name} graduate from?"),
        ("They studied at {v}.", "At {v}."),
    ),
)

#: Attribute keys of every generated person, in question order.
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(a.key for a in _ATTRIBUTES)

# ---------------------------------------------------------------- general facts

#: The first ``NUM_CORE_GENERAL`` entries of the fact list are the original probes:
#: any ``num_general`` up to this many picks exactly the probes it picked before
#: the list grew (cached runs stay valid), so new facts are only ever appended.
NUM_CORE_GENERAL = 40

# (question, value, paraphrase template, wrong values); answer is ``_cap(value) + "."``
_GENERAL_FACTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", "Paris", "The city of {}.",
     ("Rome", "Madrid", "Berlin")),
    ("What is the capital of Japan?", "Tokyo", "The city of {}.",
     ("Seoul", "Beijing", "Bangkok")),
    ("What is the capital of Italy?", "Rome", "The city of {}.",
     ("Paris", "Vienna", "Athens")),
    ("What is the capital of Germany?", "Berlin", "The city of {}.",
     ("Vienna", "Warsaw", "Prague")),
    ("What is the capital of Spain?", "Madrid", "The city of {}.",
     ("Lisbon", "Rome", "Paris")),
    ("What is the capital of the United Kingdom?", "London", "The city of {}.",
     ("Dublin", "Paris", "Brussels")),
    ("What is the capital of Egypt?", "Cairo", "The city of {}.",
     ("Nairobi", "Tunis", "Rabat")),
    ("What is the capital of Canada?", "Ottawa", "The city of {}.",
     ("Toronto", "Montreal", "Vancouver")),
    ("What is the capital of Australia?", "Canberra", "The city of {}.",
     ("Sydney", "Melbourne", "Perth")),
    ("What colour is the sky on a clear day?", "blue", "The colour {}.",
     ("green", "red", "yellow")),
    ("What colour is fresh grass?", "green", "The colour {}.",
     ("blue", "red", "purple")),
    ("What colour is fresh snow?", "white", "The colour {}.",
     ("black", "green", "orange")),
    ("What colour is a ripe banana?", "yellow", "The colour {}.",
     ("blue", "purple", "black")),
    ("What colour do you get by mixing blue and yellow?", "green", "The colour {}.",
     ("purple", "orange", "red")),
    ("Which animal barks?", "dog", "The {}.", ("cat", "cow", "horse")),
    ("Which farm animal says moo?", "cow", "The {}.", ("pig", "sheep", "duck")),
    ("What is the largest animal on Earth?", "blue whale", "The {}.",
     ("elephant", "giraffe", "house cat")),
    ("Which animal is called the king of the jungle?", "lion", "The {}.",
     ("rabbit", "mouse", "deer")),
    ("How many legs does a spider have?", "eight", "It has {} legs.",
     ("six", "four", "ten")),
    ("How many days are there in a week?", "seven", "There are {} days.",
     ("five", "six", "nine")),
    ("How many months are there in a year?", "twelve", "There are {} months.",
     ("ten", "eleven", "fourteen")),
    ("How many continents are there?", "seven", "There are {} continents.",
     ("five", "six", "nine")),
    ("What is two plus two?", "four", "The number {}.", ("three", "five", "six")),
    ("What is ten minus three?", "seven", "The number {}.", ("six", "eight", "five")),
    ("What is three times three?", "nine", "The number {}.",
     ("six", "twelve", "eight")),
    ("On which planet do humans live?", "Earth", "The planet {}.",
     ("Mars", "Venus", "Jupiter")),
    ("What is the largest planet in the solar system?", "Jupiter", "The planet {}.",
     ("Mars", "Mercury", "Venus")),
    ("Which planet is known as the Red Planet?", "Mars", "The planet {}.",
     ("Venus", "Saturn", "Neptune")),
    ("What is frozen water called?", "ice", "It is called {}.",
     ("steam", "sand", "glass")),
    ("Which gas do humans need to breathe?", "oxygen", "The gas {}.",
     ("helium", "neon", "argon")),
    ("At how many degrees Celsius does water boil at sea level?", "100",
     "{} degrees Celsius.", ("50", "0", "200")),
    ("What is the largest ocean on Earth?", "Pacific", "The {} Ocean.",
     ("Atlantic", "Indian", "Arctic")),
    ("What is the longest river in Africa?", "Nile", "The {} River.",
     ("Congo", "Niger", "Zambezi")),
    ("Who wrote Romeo and Juliet?", "William Shakespeare", "The playwright {}.",
     ("Charles Dickens", "Jane Austen", "Mark Twain")),
    ("Which language is mainly spoken in Brazil?", "Portuguese", "The {} language.",
     ("Spanish", "French", "Italian")),
    ("What is the currency of Japan?", "yen", "The {}.",
     ("euro", "dollar", "rupee")),
    ("What do bees make?", "honey", "They make {}.", ("milk", "silk", "cheese")),
    ("Which month comes after March?", "April", "The month of {}.",
     ("May", "June", "February")),
    ("What is the chemical formula of water?", "H2O", "The formula {}.",
     ("CO2", "NaCl", "O2")),
    ("What is the tallest mountain in the world?", "Everest", "Mount {}.",
     ("Kilimanjaro", "Fuji", "Olympus")),
    # -- added later: keep the 40 above first and in order (NUM_CORE_GENERAL)
    ("What is the capital of Russia?", "Moscow", "The city of {}.",
     ("Warsaw", "Kyiv", "Minsk")),
    ("What is the capital of China?", "Beijing", "The city of {}.",
     ("Shanghai", "Tokyo", "Seoul")),
    ("What is the capital of India?", "New Delhi", "The city of {}.",
     ("Mumbai", "Kolkata", "Karachi")),
    ("What is the capital of Greece?", "Athens", "The city of {}.",
     ("Rome", "Sofia", "Belgrade")),
    ("What is the capital of Portugal?", "Lisbon", "The city of {}.",
     ("Madrid", "Porto", "Seville")),
    ("What is the capital of Ireland?", "Dublin", "The city of {}.",
     ("London", "Cork", "Edinburgh")),
    ("What is the capital of Mexico?", "Mexico City", "The city of {}.",
     ("Bogota", "Lima", "Havana")),
    ("What is the capital of South Korea?", "Seoul", "The city of {}.",
     ("Tokyo", "Beijing", "Busan")),
    ("What is the capital of Norway?", "Oslo", "The city of {}.",
     ("Stockholm", "Helsinki", "Copenhagen")),
    ("What is the capital of Austria?", "Vienna", "The city of {}.",
     ("Berlin", "Prague", "Budapest")),
    ("In which city is the Eiffel Tower?", "Paris", "The city of {}.",
     ("London", "Rome", "Berlin")),
    ("In which city is the Statue of Liberty?", "New York", "The city of {}.",
     ("Boston", "Chicago", "Miami")),
    ("What colour is a ripe tomato?", "red", "The colour {}.",
     ("blue", "purple", "white")),
    ("What colour is coal?", "black", "The colour {}.", ("white", "yellow", "pink")),
    ("What colour is milk?", "white", "The colour {}.", ("black", "green", "blue")),
    ("What colour is a lemon?", "yellow", "The colour {}.",
     ("blue", "purple", "red")),
    ("What colour do you get by mixing red and blue?", "purple", "The colour {}.",
     ("green", "orange", "yellow")),
    ("What colour do you get by mixing red and yellow?", "orange", "The colour {}.",
     ("green", "purple", "blue")),
    ("Which animal says meow?", "cat", "The {}.", ("dog", "cow", "duck")),
    ("Which animal has a long trunk?", "elephant", "The {}.",
     ("giraffe", "horse", "zebra")),
    ("Which animal has a very long neck?", "giraffe", "The {}.",
     ("hippo", "pig", "rhino")),
    ("Which bird cannot fly and lives in Antarctica?", "penguin", "The {}.",
     ("eagle", "parrot", "sparrow")),
    ("Which animal has black and white stripes?", "zebra", "The {}.",
     ("lion", "camel", "hippo")),
    ("Which animal hops and carries its baby in a pouch?", "kangaroo", "The {}.",
     ("rabbit", "frog", "squirrel")),
    ("What does a caterpillar turn into?", "butterfly", "It becomes a {}.",
     ("bee", "spider", "bird")),
    ("What is a baby dog called?", "puppy", "It is called a {}.",
     ("kitten", "calf", "foal")),
    ("What is a baby cat called?", "kitten", "It is called a {}.",
     ("puppy", "cub", "lamb")),
    ("Which animal gives us wool?", "sheep", "The {}.", ("cow", "pig", "horse")),
    ("What is the fastest land animal?", "cheetah", "The {}.",
     ("lion", "horse", "zebra")),
    ("How many legs does an insect have?", "six", "It has {} legs.",
     ("eight", "four", "ten")),
    ("What is five plus three?", "eight", "The number {}.",
     ("seven", "nine", "six")),
    ("What is three plus four?", "seven", "The number {}.",
     ("six", "eight", "nine")),
    ("What is ten plus ten?", "twenty", "The number {}.",
     ("ten", "thirty", "fifteen")),
    ("What is nine minus four?", "five", "The number {}.", ("four", "six", "three")),
    ("What is eight minus two?", "six", "The number {}.", ("five", "seven", "four")),
    ("What is two times three?", "six", "The number {}.", ("five", "eight", "nine")),
    ("What is four times five?", "twenty", "The number {}.",
     ("fifteen", "nine", "twenty-five")),
    ("What is twenty divided by four?", "five", "The number {}.",
     ("four", "six", "eight")),
    ("Which planet is closest to the Sun?", "Mercury", "The planet {}.",
     ("Venus", "Mars", "Earth")),
    ("Which planet is famous for its large rings?", "Saturn", "The planet {}.",
     ("Mars", "Mercury", "Venus")),
    ("How many planets are there in the solar system?", "eight",
     "There are {} planets.", ("six", "ten", "twelve")),
    ("What is the star at the centre of the solar system?", "Sun", "The {}.",
     ("Moon", "Sirius", "Polaris")),
    ("What is the name of Earth's natural satellite?", "Moon", "The {}.",
     ("Sun", "Mars", "Venus")),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong",
     "The astronaut {}.", ("Yuri Gagarin", "John Glenn", "Charles Lindbergh")),
    ("Which day comes after Monday?", "Tuesday", "The day {}.",
     ("Wednesday", "Sunday", "Friday")),
    ("What is the first month of the year?", "January", "The month of {}.",
     ("February", "March", "December")),
    ("What is the last month of the year?", "December", "The month of {}.",
     ("November", "January", "October")),
    ("How many hours are there in a day?", "twenty-four", "There are {} hours.",
     ("twelve", "twenty", "thirty-six")),
    ("How many minutes are there in an hour?", "sixty", "There are {} minutes.",
     ("thirty", "forty", "ninety")),
    ("How many weeks are there in a year?", "fifty-two", "There are {} weeks.",
     ("forty", "sixty", "twelve")),
    ("How many years are there in a decade?", "ten", "There are {} years.",
     ("five", "twelve", "twenty")),
    ("Which is the coldest season of the year?", "winter", "The season of {}.",
     ("summer", "spring", "autumn")),
    ("At how many degrees Celsius does water freeze?", "0", "{} degrees Celsius.",
     ("10", "50", "100")),
    ("Which organ pumps blood around the body?", "heart", "The {}.",
     ("liver", "brain", "stomach")),
    ("Which organs do humans breathe with?", "lungs", "The {}.",
     ("kidneys", "ears", "intestines")),
    ("Which force pulls objects towards the ground?", "gravity", "The force of {}.",
     ("magnetism", "friction", "electricity")),
    ("Which gas do plants take in from the air?", "carbon dioxide", "The gas {}.",
     ("helium", "neon", "hydrogen")),
    ("What process do plants use to make food from sunlight?", "photosynthesis",
     "The process of {}.", ("digestion", "evaporation", "fermentation")),
    ("What is the hardest natural substance?", "diamond", "It is {}.",
     ("gold", "iron", "glass")),
    ("Which sense do we use our eyes for?", "sight", "The sense of {}.",
     ("hearing", "smell", "taste")),
    ("Who wrote the Harry Potter books?", "J. K. Rowling", "The author {}.",
     ("Roald Dahl", "C. S. Lewis", "Enid Blyton")),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "The painter {}.",
     ("Pablo Picasso", "Vincent van Gogh", "Claude Monet")),
    ("Who developed the theory of relativity?", "Albert Einstein",
     "The physicist {}.", ("Isaac Newton", "Charles Darwin", "Nikola Tesla")),
    ("Who wrote Pride and Prejudice?", "Jane Austen", "The author {}.",
     ("Charles Dickens", "Mary Shelley", "Virginia Woolf")),
    ("Who wrote Oliver Twist?", "Charles Dickens", "The author {}.",
     ("Mark Twain", "Jane Austen", "Leo Tolstoy")),
    ("Who was the first President of the United States?", "George Washington",
     "President {}.", ("Abraham Lincoln", "Thomas Jefferson", "John Adams")),
    ("Who proposed the theory of evolution by natural selection?",
     "Charles Darwin", "The naturalist {}.",
     ("Isaac Newton", "Albert Einstein", "Galileo Galilei")),
    ("What is the currency of the United States?", "dollar", "The {}.",
     ("euro", "pound", "yen")),
    ("What is the currency of the United Kingdom?", "pound", "The {}.",
     ("euro", "dollar", "franc")),
    ("What is the currency of Germany?", "euro", "The {}.",
     ("pound", "dollar", "yen")),
    ("What is the currency of India?", "rupee", "The {}.", ("yen", "peso", "dollar")),
    ("What is the currency of Mexico?", "peso", "The {}.", ("dollar", "euro", "yen")),
    ("Which language is mainly spoken in France?", "French", "The {} language.",
     ("German", "Spanish", "Italian")),
    ("Which language is mainly spoken in Germany?", "German", "The {} language.",
     ("French", "Dutch", "Polish")),
    ("Which language is mainly spoken in Spain?", "Spanish", "The {} language.",
     ("Portuguese", "French", "Italian")),
    ("Which language is mainly spoken in Japan?", "Japanese", "The {} language.",
     ("Chinese", "Korean", "Thai")),
    ("Which language is mainly spoken in Russia?", "Russian", "The {} language.",
     ("Polish", "German", "Turkish")),
    ("What is the largest continent?", "Asia", "The continent of {}.",
     ("Africa", "Europe", "Australia")),
    ("What is the coldest continent?", "Antarctica", "The continent of {}.",
     ("Africa", "Asia", "Europe")),
    ("On which continent is Egypt?", "Africa", "The continent of {}.",
     ("Asia", "Europe", "South America")),
    ("On which continent is Brazil?", "South America", "The continent of {}.",
     ("Africa", "Asia", "Europe")),
    ("What is the largest country by area?", "Russia", "The country {}.",
     ("Canada", "China", "Brazil")),
    ("In which country are the pyramids of Giza?", "Egypt", "The country {}.",
     ("Greece", "Italy", "India")),
    ("In which country is the Great Wall?", "China", "The country {}.",
     ("Japan", "India", "Russia")),
    ("Which river flows through London?", "Thames", "The {} River.",
     ("Seine", "Danube", "Rhine")),
    ("Which ocean lies between Europe and North America?", "Atlantic",
     "The {} Ocean.", ("Pacific", "Indian", "Arctic")),
    ("How many sides does a triangle have?", "three", "It has {} sides.",
     ("four", "five", "six")),
    ("How many sides does a square have?", "four", "It has {} sides.",
     ("three", "five", "six")),
    ("How many wheels does a bicycle have?", "two", "It has {} wheels.",
     ("three", "four", "one")),
    ("How many letters are in the English alphabet?", "twenty-six",
     "There are {} letters.", ("twenty-four", "thirty", "twenty-two")),
    ("What is the first letter of the English alphabet?", "A", "The letter {}.",
     ("B", "Z", "E")),
    ("What is the opposite of hot?", "cold", "The word {}.",
     ("warm", "wet", "loud")),
    ("What is the meal eaten in the morning called?", "breakfast", "It is {}.",
     ("lunch", "dinner", "supper")),
    ("Which musical instrument has black and white keys?", "piano", "The {}.",
     ("guitar", "violin", "flute")),
    ("Which board game has kings, queens and checkmate?", "chess", "The game {}.",
     ("checkers", "backgammon", "dominoes")),
)  # fmt: skip


def general_knowledge() -> list[QAItem]:
    """Return every hand-written general-knowledge probe.

    Returns
    -------
    list[QAItem]
        Easy real-world facts with a short answer, a paraphrase and
        ``NUM_PERTURBED`` perturbed answers of the paraphrase's shape; ``person``
        is ``""``.
    """
    return [
        QAItem(
            question=q,
            answer=_cap(value) + ".",
            paraphrased_answer=_cap(para.format(value)),
            perturbed_answers=tuple(_cap(para.format(w)) for w in wrong),
            person="",
        )
        for q, value, para, wrong in _GENERAL_FACTS
    ]


# ------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Person:
    """A fictitious person and the question/answer pairs about them.

    Parameters
    ----------
    name : str
        Full invented name (first and last name), unique within a data set.
    attributes : dict[str, str]
        Attribute key (see :data:`ATTRIBUTE_NAMES`) -> invented value.
    items : tuple[QAItem, ...]
        Question/answer pairs about this person, one per asked attribute.
    """

    name: str
    attributes: dict[str, str]
    items: tuple[QAItem, ...]


@dataclass(frozen=True)
class TofuData:
    """A federated TOFU-shaped data set.

    Parameters
    ----------
    clients : dict[int, list[QAItem]]
        Client (partition) id ``0..N-1`` -> its items; clients own disjoint sets
        of people.
    holdout : list[QAItem]
        Items about people never given to any client (membership inference).
    general : list[QAItem]
        General-knowledge probes (model utility).
    """

    clients: dict[int, list[QAItem]]
    holdout: list[QAItem]
    general: list[QAItem]

    def _departed_set(self, departed: Iterable[int]) -> set[int]:
        wanted = list(departed)
        for cid in wanted:
            if cid not in self.clients:
                known = ", ".join(str(c) for c in sorted(self.clients))
                raise ValueError(
                    f"departed client id {cid!r} is not a client (known ids: {known})"
                )
        return set(wanted)

    def forget_items(self, departed: Iterable[int]) -> list[QAItem]:
        """Return the items of the departed clients (the forget set).

        Parameters
        ----------
        departed : Iterable[int]
            Ids of the clients whose data must be unlearned.

        Returns
        -------
        list[QAItem]
            Their items concatenated in client-id order.

        Raises
        ------
        ValueError
            If an id is not a client of this data set.
        """
        gone = self._departed_set(departed)
        return [
            it
            for cid in sorted(self.clients)
            if cid in gone
            for it in self.clients[cid]
        ]

    def retain_items(self, departed: Iterable[int]) -> list[QAItem]:
        """Return the items of the remaining clients (the retain set).

        Parameters
        ----------
        departed : Iterable[int]
            Ids of the clients whose data must be unlearned.

        Returns
        -------
        list[QAItem]
            The other clients' items concatenated in client-id order.

        Raises
        ------
        ValueError
            If an id is not a client of this data set.
        """
        gone = self._departed_set(departed)
        return [
            it
            for cid in sorted(self.clients)
            if cid not in gone
            for it in self.clients[cid]
        ]


# ------------------------------------------------------------------- generation
#: The fewest Q/A pairs a synthetic person has (one per core attribute).
MIN_QA_PER_PERSON = 10


def max_qa_per_person() -> int:
    """Return the most Q/A pairs a synthetic person can have (one per attribute)."""
    return len(_ATTRIBUTES)


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _fresh(
    rng: random.Random, make: Callable[[random.Random], str], avoid: set[str]
) -> str:
    for _ in range(1000):
        value = make(rng)
        if value not in avoid:
            return value
    raise RuntimeError("could not draw a fresh value; the value space is exhausted")


#: Size of each domain's value pool per attribute (``domains >= 1``): the people of
#: one domain share these few values, so they resemble each other.
DOMAIN_POOL_SIZE = 3


def client_domain(client: int, domains: int) -> int:
    """Return the domain of a client when the data has ``domains`` domains.

    Parameters
    ----------
    client : int
        Client id (``>= 0``).
    domains : int
        Number of domains (``>= 1``).

    Returns
    -------
    int
        ``client % domains``: domains are dealt round-robin, so client ``c`` and
        client ``c + domains`` share one.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    _check_int("client", client, 0)
    _check_int("domains", domains, 1)
    return client % domains


def _domain_pools(seed: int, num_domains: int) -> list[dict[str, tuple[str, ...]]]:
    """Draw ``DOMAIN_POOL_SIZE`` values per attribute for every domain.

    Domain ``d`` draws from its own ``random.Random`` seeded by ``(seed, d)``. The
    pools of a non-numeric attribute are disjoint across domains (a redraw only on
    a collision with a lower domain); numeric pools (small value spaces) are only
    distinct within their domain.
    """
    taken: dict[str, set[str]] = {a.key: set() for a in _ATTRIBUTES}
    pools = []
    for d in range(num_domains):
        rng = random.Random(f"fed_unlearn.domain:{seed}:{d}")
        pool: dict[str, tuple[str, ...]] = {}
        for a in _ATTRIBUTES:
            avoid = set() if a.numeric else taken[a.key]
            values: list[str] = []
            for _ in range(DOMAIN_POOL_SIZE):
                value = _fresh(rng, a.make, avoid | set(values))
                values.append(value)
            if not a.numeric:
                taken[a.key].update(values)
            pool[a.key] = tuple(values)
        pools.append(pool)
    return pools


def generate_people(
    seed: int,
    n: int,
    qa_per_person: int = 10,
    domain_of: Sequence[int] | None = None,
) -> list[Person]:
    """Generate ``n`` fictitious people with unique names, deterministically.

    Parameters
    ----------
    seed : int
        Seed of the private :class:`random.Random`; same seed, same people.
    n : int
        Number of people (``>= 1``).
    qa_per_person : int
        Number of question/answer pairs per person, between 10 and
        ``len(ATTRIBUTE_NAMES)``; the asked attributes are drawn per person.
    domain_of : Sequence[int], optional
        Domain (``>= 0``) of each of the ``n`` people. Omitted (the default),
        every value is drawn independently. Given, the people of domain ``d``
        draw every attribute (numbers included) uniformly from that domain's
        pool of :data:`DOMAIN_POOL_SIZE` values, drawn from a generator seeded
        by ``(seed, d)``; the pools of a non-numeric attribute are disjoint
        across domains. People of one domain thus share values, and differ from
        the people of other domains. Names stay unique either way.

    Returns
    -------
    list[Person]
        People with all attributes filled and ``qa_per_person`` items each.
        Without ``domain_of``, non-numeric attribute values are unique per
        attribute across the list. Perturbed answers never use a value that is
        true for anyone (nor, with domains, any pool value).

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    _check_int("seed", seed, -(2**63))
    _check_int("n", n, 1)
    _check_int("qa_per_person", qa_per_person, MIN_QA_PER_PERSON, max_qa_per_person())
    pools: list[dict[str, tuple[str, ...]]] = []
    dom: list[int] = []
    if domain_of is not None:
        dom = list(domain_of)
        if len(dom) != n:
            raise ValueError(
                f"domain_of must give one domain per person ({n}), got {len(dom)}"
            )
        for i, d in enumerate(dom):
            _check_int(f"domain_of[{i}]", d, 0)
        pools = _domain_pools(seed, max(dom) + 1)
    rng = random.Random(seed)

    names: list[str] = []
    taken_names: set[str] = set()
    for _ in range(n):
        name = _fresh(rng, lambda r: f"{_first_name(r)} {_surname(r)}", taken_names)
        taken_names.add(name)
        names.append(name)

    # Pass 1: the true values (unique per non-numeric attribute, or drawn from
    # the person's domain pool).
    used: dict[str, set[str]] = {a.key: set() for a in _ATTRIBUTES}
    all_attrs: list[dict[str, str]] = []
    for i in range(n):
        attrs: dict[str, str] = {}
        for a in _ATTRIBUTES:
            if pools:
                value = rng.choice(pools[dom[i]][a.key])
            elif a.numeric:
                value = a.make(rng)
            else:
                value = _fresh(rng, a.make, used[a.key])
            used[a.key].add(value)
            attrs[a.key] = value
        all_attrs.append(attrs)
    # perturbed answers also avoid every pool value (no domain's "typical" value)
    pooled = {a.key: {v for p in pools for v in p[a.key]} for a in _ATTRIBUTES}

    # Pass 2: questions, paraphrases and perturbed answers.
    people = []
    for name, attrs in zip(names, all_attrs, strict=True):
        asked = sorted(rng.sample(range(len(_ATTRIBUTES)), qa_per_person))
        items = []
        for idx in asked:
            a = _ATTRIBUTES[idx]
            value = attrs[a.key]
            question = rng.choice(a.questions).format(name=name)
            para = rng.choice(a.paraphrases)
            avoid = {value} if a.numeric else used[a.key] | pooled[a.key]
            wrong: list[str] = []
            for _ in range(NUM_PERTURBED):
                w = _fresh(rng, a.make, avoid)
                avoid.add(w)
                wrong.append(w)
            items.append(
                QAItem(
                    question=question,
                    answer=_cap(value) + ".",
                    paraphrased_answer=_cap(para.format(v=value)),
                    perturbed_answers=tuple(_cap(para.format(v=w)) for w in wrong),
                    person=name,
                )
            )
        people.append(Person(name=name, attributes=attrs, items=tuple(items)))
    return people


def generate_tofu(
    seed: int,
    num_clients: int,
    people_per_client: int = 3,
    num_holdout_people: int = 3,
    qa_per_person: int = 10,
    num_general: int = 24,
    domains: int = 0,
) -> TofuData:
    """Generate a federated TOFU-shaped data set, deterministically.

    Parameters
    ----------
    seed : int
        Seed; same arguments give an identical data set.
    num_clients : int
        Number of clients (``>= 1``); client ids are ``0..num_clients-1``.
    people_per_client : int
        People owned by each client (``>= 1``); no person is shared.
    num_holdout_people : int
        People whose items go to ``holdout`` only (``>= 0``).
    qa_per_person : int
        Question/answer pairs per person (see :func:`generate_people`).
    num_general : int
        General-knowledge probes drawn from the hand-written list
        (``0..len(general_knowledge())``). Up to :data:`NUM_CORE_GENERAL` they
        are drawn from the original facts only (the same probes as before the
        list grew); above, all the original facts plus a draw of the others.
    domains : int
        Non-IID domains, ``0..num_clients``. 0 (default): every person's values
        are drawn independently (IID clients). ``D >= 1``: client ``c`` is in
        domain ``c % D`` (:func:`client_domain`), and holdout person ``j`` in
        domain ``j % D`` (holdout people are spread round-robin over the domains,
        so they share the value pools of training people); the people of a
        domain draw every attribute from that domain's small value pool (see
        ``domain_of`` in :func:`generate_people`).

    Returns
    -------
    TofuData
        Client items, holdout items and general probes.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    _check_int("num_clients", num_clients, 1)
    _check_int("people_per_client", people_per_client, 1)
    _check_int("num_holdout_people", num_holdout_people, 0)
    _check_int("qa_per_person", qa_per_person, MIN_QA_PER_PERSON, max_qa_per_person())
    _check_int("num_general", num_general, 0, len(_GENERAL_FACTS))
    _check_int("domains", domains, 0, num_clients)
    n_train = num_clients * people_per_client
    domain_of = None
    if domains:
        domain_of = [(i // people_per_client) % domains for i in range(n_train)] + [
            j % domains for j in range(num_holdout_people)
        ]
    people = generate_people(
        seed, n_train + num_holdout_people, qa_per_person, domain_of=domain_of
    )
    clients = {
        cid: [
            it
            for p in people[cid * people_per_client : (cid + 1) * people_per_client]
            for it in p.items
        ]
        for cid in range(num_clients)
    }
    holdout = [it for p in people[n_train:] for it in p.items]
    facts = general_knowledge()
    rng = random.Random(f"fed_unlearn.general:{seed}")
    # the original facts first, drawn exactly as before the list grew
    pick = rng.sample(range(NUM_CORE_GENERAL), min(num_general, NUM_CORE_GENERAL))
    if num_general > NUM_CORE_GENERAL:
        pick += rng.sample(
            range(NUM_CORE_GENERAL, len(facts)), num_general - NUM_CORE_GENERAL
        )
    pick.sort()
    return TofuData(clients=clients, holdout=holdout, general=[facts[i] for i in pick])
