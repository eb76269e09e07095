"""story_retrieval, story_multihop, story_filtering: questions about a generated multi-chapter narrative.

A travelling merchant (the protagonist) visits one place per chapter. Each chapter has: a unique
(location, character) pair, an event, a short conversation, exactly one purchase of a globally unique item
(adjective x material x object, e.g. "polished brass compass"), with some chance the sale of an older item
still owned, and closing sentences. Chapters are generated (as a prefix of one seeded sequence) until the
length is reached; since a chapter is longer than the 5% window, a few plain prose sentences (filler.py)
spread over the chapters close the remaining gap.

Sentence shapes the answers rely on: the location appears as "the <Adjective> <Place>", the character in
"... met <First> <Last> ...", the purchase as "... bought a(n) <item> ...", a sale as "... sold the <item> ...".

- story_retrieval: min(16, 3 x chapters) questions "In chapter k, which place did P visit / whom did P meet /
  which item did P buy?"; answer lines "1. <answer>" (scored: fraction exact after SQuAD normalisation).
- story_multihop: "Which item did P acquire just before acquiring the X?" (the previous chapter's purchase).
- story_filtering: the purchase sentence is removed from 3 chapters, and every later sentence that mentions
  those items; "In which 3 chapters did P buy nothing?", answer "<answer>a, b, c</answer>".
"""

from __future__ import annotations

import random
from abc import abstractmethod
from dataclasses import dataclass, field

from .base import Sample, Task, TokenCounter, assemble_prompt, fit_length_2d, make_rng, require_window
from .filler import prose_sentences

PROTAGONISTS = ["Elena", "Tomas", "Mirela", "Jonah", "Ines", "Arlo", "Sabine", "Kasimir", "Nadia", "Oskar",
                "Livia", "Bruno", "Teodora", "Felix", "Marta", "Anselm"]
FIRST_NAMES = ["Tobias", "Greta", "Ruben", "Hilde", "Casper", "Odile", "Matteo", "Ysolde", "Leander", "Brigid",
               "Ambrose", "Clementine", "Dorian", "Esme", "Florian", "Ingrid", "Jasper", "Katya", "Lucian",
               "Magda", "Niall", "Ottilie", "Piers", "Rosalind", "Silas", "Tamsin", "Ulric", "Vera", "Wendel",
               "Zelda", "Corin", "Petra"]
LAST_NAMES = ["Wren", "Holloway", "Marsh", "Ferrante", "Blackwood", "Quill", "Ashdown", "Vance", "Okafor",
              "Lindqvist", "Castell", "Dray", "Fennimore", "Galloway", "Hartigan", "Ives", "Jessop", "Kerrigan",
              "Lorne", "Maddox", "Northcott", "Pell", "Ravenscroft", "Stroud", "Thorne", "Underhill", "Varga",
              "Whitlock", "Yardley", "Zeller"]
PLACE_ADJ = ["Amber", "Copper", "Hollow", "Silver", "Willow", "Crooked", "Golden", "Misty", "Scarlet", "Quiet",
             "Windy", "Old", "Painted", "Sunken", "Frozen", "Hidden", "Iron", "Lantern", "Velvet", "Thistle",
             "Marble", "Ember", "Cobalt", "Juniper"]
PLACE_NOUN = ["Market", "Harbor", "Library", "Bridge", "Tavern", "Abbey", "Orchard", "Quarry", "Bazaar",
              "Lighthouse", "Mill", "Courtyard", "Observatory", "Vineyard", "Crossing", "Garden", "Theatre",
              "Foundry", "Monastery", "Pier", "Citadel", "Fairground", "Archive", "Spa"]
ITEM_ADJ = ["polished", "faded", "ornate", "tiny", "heavy", "ancient", "gleaming", "battered", "delicate",
            "enormous", "striped", "carved", "dented", "elegant", "humble", "painted", "rusty", "sturdy",
            "twisted", "velvety", "weathered", "glossy", "chipped", "fragrant", "lopsided", "shimmering",
            "speckled", "quilted", "hollow", "engraved"]
ITEM_MATERIAL = ["brass", "silk", "oak", "silver", "leather", "glass", "copper", "wool", "ivory", "jade",
                 "porcelain", "bronze", "linen", "walnut", "pewter", "bamboo", "iron", "velvet", "amber", "clay"]
ITEM_TYPE = ["compass", "scarf", "lantern", "teapot", "flute", "mirror", "chessboard", "hourglass", "locket",
             "goblet", "kite", "inkwell", "bracelet", "telescope", "comb", "bell", "candlestick",
             "satchel", "spoon", "figurine", "thimble", "whistle", "bowl", "box", "brooch", "cup", "dagger",
             "helmet", "jug"]

EVENTS = [
    "A sudden rain shower sent everyone running for cover under the awnings.",
    "A travelling circus paraded through the streets with drums and bright banners.",
    "A runaway cart full of cabbages rattled down the slope and scattered its load.",
    "Church bells rang for a wedding, and children threw petals at the couple.",
    "A heated argument about the price of grain broke out near the fountain.",
    "A flock of pigeons burst into the air when a cannon was fired for the mayor's birthday.",
    "Fog rolled in from the sea so thickly that the lamps had to be lit at noon.",
    "A lost dog followed the merchant for a while before finding its owner.",
    "A juggler dropped all his torches at once, and the crowd laughed kindly.",
    "The town crier announced that the river ferry would not run the next day.",
    "A small fire in a bakery chimney was put out quickly by the neighbours.",
    "Musicians tuned their instruments on the steps for the evening dance.",
    "A procession of monks walked silently past, carrying candles.",
    "A strong wind tore a sail from a fishing boat and sent it flapping over the roofs.",
    "Two old friends met by chance and embraced in the middle of the square.",
    "A goat escaped from its pen and climbed onto the roof of a shed.",
    "The first snow of the season fell, soft and quiet, on the cobblestones.",
    "A painter set up an easel and began to sketch the crowded street.",
]
GREETINGS = [
    "Welcome, traveller. What brings you here?",
    "You look tired from the road. Have you come far?",
    "Ah, a new face! Do you plan to stay long?",
    "Good day to you. Is business good on the roads?",
    "I have not seen you before. Are you looking for something special?",
    "Come in from the cold. Would you like some tea?",
]
REPLIES = [
    "Only a night or two, then the road calls again.",
    "Far enough that my boots are begging for rest.",
    "Business is fair, though the roads are muddy.",
    "I am always looking for something special.",
    "Tea would be most welcome, thank you.",
    "I follow the markets wherever they lead me.",
]
FAREWELLS = [
    "Then I wish you luck in your trading.",
    "Mind the bridge on your way out; it is slippery.",
    "Come back and tell me your stories some day.",
    "Safe travels, and do not trust the weather here.",
]
ARRIVALS = [
    "{P} arrived at {L} as the morning bells rang.",
    "Early that day, {P} made the long walk to {L}.",
    "The road led {P} to {L} before noon.",
    "After a night on the road, {P} reached {L}.",
]
MEETINGS = [
    "There, {P} met {C}, who knew everyone in the neighbourhood.",
    "Soon {P} met {C}, a talkative local with a booming laugh.",
    "Near the entrance {P} met {C}, who offered to show the way.",
    "By chance {P} met {C}, an old acquaintance of a friend.",
]
PURCHASES = [
    "After some haggling, {P} bought {A} {I} from a stall keeper.",
    "Before leaving, {P} bought {A} {I} that had caught the eye.",
    "With a handful of coins, {P} bought {A} {I} for the collection.",
    "On the advice of {C}, {P} bought {A} {I}.",
]
SALES = [
    "{P} also sold the {I} to a collector who had admired it.",
    "Needing coin for the journey, {P} sold the {I} to a pawnbroker.",
    "To make room in the pack, {P} sold the {I} to a curious shopkeeper.",
]
CLOSINGS = [
    "As the lamps were lit, {P} wrote a few lines in a worn journal.",
    "That night {P} slept soundly in a small room above the inn.",
    "{P} watched the sunset and thought about the road ahead.",
    "Before bed, {P} counted the remaining coins twice.",
    "The evening ended with a simple supper of bread and soup.",
    "{P} fell asleep listening to the rain on the roof.",
]


def _comma(quote: str) -> str:
    """A quoted statement followed by its speaker ends with a comma: "Fine," said X."""
    return quote[:-1] + "," if quote.endswith(".") else quote


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass
class Chapter:
    number: int
    location: str  # "the Amber Market"
    character: str  # "Tobias Wren"
    item: str  # "polished brass compass"
    sold: str | None  # an older item sold in this chapter
    arrival: str
    meeting: str
    event: str
    conversation: list[str]
    purchase: str
    sale: str | None
    closing: list[str] = field(default_factory=list)


class StoryWorld:
    """The endless seeded chapter sequence of one sample; chapters are generated on demand."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.protagonist = rng.choice(PROTAGONISTS)
        self.chapters: list[Chapter] = []
        self._pairs: set[tuple[str, str]] = set()
        self._items: set[str] = set()
        self._owned: list[str] = []

    def chapter(self, k: int) -> Chapter:
        """Chapter k (1-based)."""
        while len(self.chapters) < k:
            self.chapters.append(self._next())
        return self.chapters[k - 1]

    def _next(self) -> Chapter:
        r, P = self.rng, self.protagonist
        while True:
            loc = f"the {r.choice(PLACE_ADJ)} {r.choice(PLACE_NOUN)}"
            who = f"{r.choice(FIRST_NAMES)} {r.choice(LAST_NAMES)}"
            if (loc, who) not in self._pairs:
                self._pairs.add((loc, who))
                break
        while True:
            item = f"{r.choice(ITEM_ADJ)} {r.choice(ITEM_MATERIAL)} {r.choice(ITEM_TYPE)}"
            if item not in self._items:
                self._items.add(item)
                break
        sold = None
        if self._owned and r.random() < 0.3:
            sold = self._owned.pop(r.randrange(len(self._owned)))
        first = who.split()[0]
        conversation = [
            f'"{r.choice(GREETINGS)}" asked {first}.',
            f'"{_comma(r.choice(REPLIES))}" answered {P}.',
            f'"{_comma(r.choice(FAREWELLS))}" said {first}.',
        ]
        ch = Chapter(
            number=len(self.chapters) + 1, location=loc, character=who, item=item, sold=sold,
            arrival=r.choice(ARRIVALS).format(P=P, L=loc),
            meeting=r.choice(MEETINGS).format(P=P, C=who),
            event=r.choice(EVENTS),
            conversation=conversation,
            purchase=r.choice(PURCHASES).format(P=P, A=article(item), I=item, C=who),
            sale=r.choice(SALES).format(P=P, I=sold) if sold else None,
            closing=[s.format(P=P) for s in r.sample(CLOSINGS, 2)],
        )
        self._owned.append(item)
        return ch

    def render(
        self, c: int, extra: list[list[str]] | None = None, hidden_chapters: frozenset[int] = frozenset()
    ) -> str:
        """Chapters 1..c; `extra[k-1]` are prose sentences for chapter k; the purchase sentence of every chapter
        in `hidden_chapters` is left out, as is any sentence mentioning an item bought there."""
        hidden_items = {self.chapter(k).item for k in hidden_chapters}
        parts = []
        for k in range(1, c + 1):
            ch = self.chapter(k)
            body = [ch.arrival, ch.meeting, ch.event, *ch.conversation]
            if k not in hidden_chapters:
                body.append(ch.purchase)
            if ch.sale and ch.sold not in hidden_items:
                body.append(ch.sale)
            if extra:
                body += extra[k - 1]
            body += ch.closing
            parts.append(f"Chapter {k}\n" + " ".join(body))
        return "\n\n".join(parts)


_FINE_MAX = 16  # prose sentences available to the fine stage


class _StoryTask(Task):
    kind = "natural"
    min_chapters = 2

    def build(self, length: int, seed: int, index: int, counter: TokenCounter) -> Sample:
        base = (self.name, length, seed, index)
        rng = make_rng(*base)
        world = StoryWorld(rng)
        prose = prose_sentences(make_rng(*base, "prose"), _FINE_MAX)
        c_max = length // 80 + 4
        P = world.protagonist
        intro_tpl = (f"Below is a story in {{c}} chapters about {P}, a travelling merchant who visits a new place "
                     "in every chapter. Read it carefully and answer the question{s} that follow{v}.")
        results: dict[int, tuple[str, str, object, dict]] = {}

        def parts(c: int) -> tuple[str, str, object, dict]:
            if c not in results:
                results[c] = self.question(world, c, make_rng(*base, "question", c))
            return results[c]

        def build(c: int, d: int) -> str:
            question, fmt, _, meta = parts(c)
            extra = [[] for _ in range(c)]
            for j in range(d):
                extra[(j * 7) % c].append(prose[j])
            plural = self.name == "story_retrieval" and len(meta.get("questions", [])) > 1
            intro = intro_tpl.format(c=c, s="s" if plural else "", v="" if plural else "s")
            story = world.render(c, extra, frozenset(meta.get("hidden_chapters", ())))
            return assemble_prompt(intro, question, story, fmt)

        c, d, res = fit_length_2d(counter, length, build, c_max, _FINE_MAX, c_min=self.min_chapters)
        require_window(res, self.name, length)
        _, _, gold, meta = parts(c)
        return Sample(
            task=self.name, length=length, seed=seed, index=index, prompt=res.text, gold=gold,
            metadata={**meta, "chapters": c, "prose_sentences": d, "protagonist": P, "count_calls": res.calls},
            prompt_tokens=res.tokens,
        )

    @abstractmethod
    def question(self, world: StoryWorld, c: int, rng: random.Random) -> tuple[str, str, object, dict]:
        """(question block, answer format, gold, metadata) for a story of c chapters."""


class StoryRetrieval(_StoryTask):
    name = "story_retrieval"
    min_chapters = 1
    num_questions = 16  # the Sparse Frontier's story retrieval asks 16 factoid questions

    def question(self, world, c, rng):
        P = world.protagonist
        pool = [(k, kind) for k in range(1, c + 1) for kind in ("location", "character", "item")]
        chosen = rng.sample(pool, min(self.num_questions, len(pool)))
        lines, gold = [], []
        for i, (k, kind) in enumerate(chosen, 1):
            ch = world.chapter(k)
            if kind == "location":
                lines.append(f"{i}. In chapter {k}, which place did {P} visit?")
                gold.append(ch.location)
            elif kind == "character":
                lines.append(f"{i}. In chapter {k}, whom did {P} meet?")
                gold.append(ch.character)
            else:
                lines.append(f"{i}. In chapter {k}, which item did {P} buy?")
                gold.append(ch.item)
        question = "Questions:\n" + "\n".join(lines)
        n = len(lines)
        fmt = "<answer>\n1. <answer to question 1>\n" + (f"...\n{n}. <answer to question {n}>\n" if n > 1 else "")
        fmt += "</answer>\nwith one line per question, in order, each answer a short name as written in the story."
        meta = {"questions": [{"chapter": k, "kind": kind} for k, kind in chosen]}
        return question, fmt, gold, meta


class StoryMultihop(_StoryTask):
    name = "story_multihop"
    min_chapters = 2

    def question(self, world, c, rng):
        k = rng.randrange(2, c + 1)
        target, gold = world.chapter(k).item, world.chapter(k - 1).item
        question = f"Question: Which item did {world.protagonist} acquire just before acquiring the {target}?"
        fmt = "<answer>item</answer>\nwhere item is the full name of the item as written in the story."
        return question, fmt, [gold], {"target_item": target, "target_chapter": k}


class StoryFiltering(_StoryTask):
    name = "story_filtering"
    min_chapters = 4
    num_hidden = 3  # chapters whose purchase is removed

    def question(self, world, c, rng):
        hidden = sorted(rng.sample(range(1, c + 1), self.num_hidden))
        question = (f"Question: In {self.num_hidden} chapters of the story, {world.protagonist} did not buy any "
                    "item. Which chapters are they?")
        fmt = "<answer>N1, N2, N3</answer>\nwhere N1, N2, N3 are those chapter numbers."
        return question, fmt, hidden, {"hidden_chapters": hidden}
