"""The generated world the demo models learn from: people, places, dates and quantities, written out
as short facts, and every head's task built on those facts.

Everything is drawn from a seeded `random.Random`, so the same seed gives the same text. People's
names are made of syllables; names used for training and names held out for evaluation never
overlap, so an evaluation set asks about people the model has never seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

SYLLABLES = ("ka", "lo", "mi", "ra", "ten", "dor", "vi", "sa", "nel", "bo", "ru", "fi", "gan", "te", "lu",
             "mar", "shi", "zo", "pe", "an", "kel", "to", "ri", "va", "mon", "del", "su", "ha", "jo", "bri")
# Real first names, for training only (the README's example asks about Ada).
FAMOUS = ("Ada", "Alan", "Grace", "Marie", "Isaac", "Emmy", "Nikola", "Rosalind", "Charles", "Sofia",
          "Albert", "Hedy", "Niels", "Lise", "Carl", "Mary", "Kurt", "Rachel", "Enrico", "Barbara")
CITIES = ("Paris", "Rome", "Lima", "Oslo", "Cairo", "Delhi", "Tokyo", "Berlin", "Madrid", "Vienna", "Dublin",
          "Lisbon", "Prague", "Quito", "Accra", "Hanoi", "Seoul", "Manila", "Nairobi", "Athens", "Warsaw",
          "Boston", "Denver", "Sydney", "Toronto", "Havana", "Bogota", "Santiago", "Helsinki", "Zurich")
COUNTRIES = ("France", "Italy", "Peru", "Norway", "Egypt", "India", "Japan", "Germany", "Spain", "Austria",
             "Ireland", "Portugal", "Chile", "Ghana", "Kenya", "Greece", "Poland", "Canada", "Cuba", "Brazil")
JOBS = ("doctor", "teacher", "baker", "pilot", "farmer", "painter", "lawyer", "nurse", "writer", "chemist",
        "engineer", "singer", "sailor", "tailor", "judge", "banker", "miner", "poet", "architect", "dentist")
ADJECTIVES = ("silent", "golden", "distant", "broken", "hidden", "little", "final", "northern", "bright", "lost")
NOUNS = ("river", "garden", "letter", "mountain", "window", "journey", "city", "song", "island", "machine")
ANIMALS = ("cats", "dogs", "horses", "birds", "goats", "sheep")
ORG_KINDS = ("Labs", "Motors", "Bank", "Press", "Foods", "Systems")
THINGS = ("film", "book", "meal", "hotel", "concert", "game", "phone", "trip", "show", "coffee")
GOOD = ("great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "pleasant")
BAD = ("terrible", "awful", "boring", "dreadful", "poor", "horrible", "disappointing", "bland")


def syllable_names(count: int = 2400, seed: int = 1234) -> list[str]:
    """Distinct capitalized names of two or three syllables."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize())
    return sorted(names)


NAMES = syllable_names()
TRAIN_NAMES = tuple(NAMES[0::4] + NAMES[1::4] + NAMES[2::4]) + FAMOUS  # three quarters, plus the famous
HELD_OUT_NAMES = tuple(NAMES[3::4])


@dataclass
class Person:
    name: str
    surname: str
    born: str  # a city
    year: str
    job: str
    works_in: str
    title: str  # something they wrote
    written: str  # its year
    pets: str  # how many
    animal: str


def person(rng: random.Random, names: tuple[str, ...]) -> Person:
    year = rng.randint(1700, 1990)
    return Person(rng.choice(names), rng.choice(names), rng.choice(CITIES), str(year), rng.choice(JOBS),
                  rng.choice(CITIES), f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}",
                  str(year + rng.randint(18, 60)), str(rng.randint(2, 12)), rng.choice(ANIMALS))


# One fact per kind: its sentence, and the questions it answers as (question, answer) pairs.
def facts(p: Person) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    return {
        "born": (f"{p.name} was born in {p.born} in {p.year}.",
                 [(f"Where was {p.name} born?", p.born), (f"When was {p.name} born?", p.year),
                  (f"Who was born in {p.born} in {p.year}?", p.name)]),
        "job": (f"{p.name} works as a {p.job} in {p.works_in}.",
                [(f"What does {p.name} do?", p.job), (f"Where does {p.name} work?", p.works_in),
                 (f"Who works as a {p.job}?", p.name)]),
        "wrote": (f"{p.name} wrote {p.title} in {p.written}.",
                  [(f"Who wrote {p.title}?", p.name), (f"What did {p.name} write?", p.title),
                   (f"When did {p.name} write {p.title}?", p.written)]),
        "pets": (f"{p.name} has {p.pets} {p.animal}.",
                 [(f"How many {p.animal} does {p.name} have?", p.pets)]),
    }


def written_by(p: Person) -> tuple[str, list[tuple[str, str]]]:
    """A fact about "it" (no other person in the context): "It was written by Ada in 1843."."""
    return (f"It was written by {p.name} in {p.written}.",
            [("Who wrote it?", p.name), ("When was it written?", p.written)])


def bio(p: Person) -> list[str]:
    """A person's facts in their usual order: the sentences of a short document."""
    return [sentence for sentence, _ in facts(p).values()]


class World:
    """Examples of every task, drawn from `names` (TRAIN_NAMES or HELD_OUT_NAMES)."""

    def __init__(self, seed: int, names: tuple[str, ...]):
        self.rng = random.Random(seed)
        self.names = names

    def person(self) -> Person:
        return person(self.rng, self.names)

    def people(self, count: int) -> list[Person]:
        """`count` people with distinct names and distinct facts (so every question has one answer)."""
        chosen: list[Person] = []
        while len(chosen) < count:
            p = self.person()
            if all(p.name != o.name and p.born != o.born and p.job != o.job and p.title != o.title
                   and p.animal != o.animal for o in chosen):
                chosen.append(p)
        return chosen

    # ---- qa, multiple-choice ---------------------------------------------------------------

    def qa(self) -> dict[str, Any]:
        """A question, a context of one to four facts about different people, and the answer's text."""
        if self.rng.random() < 0.15:
            sentence, questions = written_by(self.person())
            question, answer = self.rng.choice(questions)
            return {"question": question, "context": sentence, "answers": [answer]}
        people = self.people(self.rng.randint(1, 4))
        sentences = [self.rng.choice(list(facts(p).values())) for p in people]
        question, answer = self.rng.choice(sentences[0][1])
        context = [s for s, _ in sentences]
        self.rng.shuffle(context)
        return {"question": question, "context": " ".join(context), "answers": [answer]}

    def multiple_choice(self) -> dict[str, Any]:
        """Which sentence comes next: a sentence of a person's bio as the prompt; the bio's next sentence
        and the same sentence about three other people as the choices."""
        people = self.people(4)
        first = self.rng.randrange(len(bio(people[0])) - 1)
        choices = [bio(p)[first + 1] for p in people]
        answer = choices[0]
        self.rng.shuffle(choices)
        return {"prompt": bio(people[0])[first], "choices": choices, "label": choices.index(answer)}

    # ---- nsp, pretraining, mlm, causal-lm ---------------------------------------------------

    def sentence_pair(self) -> dict[str, Any]:
        """Two sentences: B follows A in a person's bio (is_next), or B is about someone else."""
        p, other = self.people(2)
        sentences = bio(p)
        first = self.rng.randrange(len(sentences) - 1)
        is_next = self.rng.random() < 0.5
        b = sentences[first + 1] if is_next else self.rng.choice(bio(other))
        return {"a": sentences[first], "b": b, "is_next": is_next}

    def document(self) -> str:
        p = self.person()
        if self.rng.random() < 0.2:
            return written_by(p)[0]
        sentences = bio(p)
        return " ".join(sentences[:self.rng.randint(1, len(sentences))])

    # ---- classification --------------------------------------------------------------------

    def sentiment(self) -> dict[str, Any]:
        """A short review; its label follows the adjective, flipped by "not"."""
        positive = self.rng.random() < 0.5
        negated = self.rng.random() < 0.3
        adjective = self.rng.choice(BAD if positive == negated else GOOD)
        thing = self.rng.choice(THINGS)
        verb = "was not" if negated else "was"
        template = self.rng.choice((f"The {thing} {verb} {adjective}.",
                                    f"I think the {thing} {verb} {adjective}.",
                                    f"Honestly, the {thing} {verb} really {adjective}.",
                                    f"{self.rng.choice(self.names)} said the {thing} {verb} {adjective}."))
        return {"text": template, "label": "positive" if positive else "negative"}

    def entities(self) -> dict[str, Any]:
        """A sentence with people (PER), places (LOC) and organizations (ORG) marked by character span."""
        def full_name() -> tuple[str, str]:
            p = self.person()
            return ("PER", p.name if self.rng.random() < 0.5 else f"{p.name} {p.surname}")

        def place() -> tuple[str, str]:
            return ("LOC", self.rng.choice(CITIES + COUNTRIES))

        def org() -> tuple[str, str]:
            owner = self.rng.choice(self.names + CITIES)
            return ("ORG", self.rng.choice((f"{owner} {self.rng.choice(ORG_KINDS)}", f"University of {owner}")))

        templates = (
            ("{} moved from {} to {}.", (full_name, place, place)),
            ("{} joined {} in {}.", (full_name, org, lambda: ("", str(self.rng.randint(1950, 2020))))),
            ("{} opened an office in {}.", (org, place)),
            ("{} met {} in {}.", (full_name, full_name, place)),
            ("Yesterday {} hired {} as a {}.", (org, full_name, lambda: ("", self.rng.choice(JOBS)))),
            ("The {} from {} works for {}.", (lambda: ("", self.rng.choice(JOBS)), place, org)),
        )
        template, parts = self.rng.choice(templates)
        pieces = template.split("{}")
        text, entities = pieces[0], []
        for make, after in zip(parts, pieces[1:]):
            kind, value = make()
            if kind:
                entities.append({"entity_group": kind, "start": len(text), "end": len(text) + len(value)})
            text += value + after
        return {"text": text, "entities": entities}

    # ---- base (embeddings) -----------------------------------------------------------------

    def paraphrase(self) -> dict[str, Any]:
        """A fact and the same fact reworded: the embedding of one should find the other."""
        p = self.person()
        return self.rng.choice((
            {"text": f"{p.name} was born in {p.born} in {p.year}.", "match": f"In {p.year}, {p.name} was born in {p.born}."},
            {"text": f"{p.name} works as a {p.job} in {p.works_in}.", "match": f"In {p.works_in}, {p.name} is a {p.job}."},
            {"text": f"{p.name} wrote {p.title} in {p.written}.", "match": f"{p.title} was written by {p.name} in {p.written}."},
        ))
