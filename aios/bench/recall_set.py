"""A retrieval set for memory search: conversations between people and an assistant, and questions
about what was said in them, each with the one turn that answers it. Generated, seeded, nothing
downloaded: `recall_set(seed)` gives the same set every time.

Why generated: of the packages listed on PyPI, none we found ships a long-conversation memory benchmark
(LoCoMo, LongMemEval) with its data (the harnesses that run them download it), and nothing may be
fetched at run time. So the set is built the way those benchmarks are: several conversations, each
small talk with personal facts dropped in among it, and questions about those facts, searched in
that conversation's memory only (one agent per conversation).

What makes it a fair test of both rankings:
- Two kinds of question in equal numbers (alternating per fact). A *keyword* question shares a
  distinctive word with the turn that answers it ("What did we name the beagle puppy?" for "We
  adopted a beagle puppy in May and named her Biscuit"). A *paraphrase* question shares none but
  function words ("What is my dog called?"): only a ranking by meaning can find it.
- Distractors: the small talk reuses the facts' vocabulary (a neighbour's dog, a colleague's new
  job, a friend's trip); half the facts also get a decoy, the same topic about someone else with
  other details ("My colleague's terrier puppy Pepper ran off"); every question is full of function
  words that match many turns; and the assistant's replies echo the topic of the turn before them.

The figures are for comparing rankings on one set, not a claim about any other data.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

#: 16 conversations of about 50 turns (808 with the default seed), 160 questions
CONVERSATIONS = 16
FACTS_PER_CONVERSATION = 10
SMALL_TALK_PER_CONVERSATION = 10
DECOY_SHARE = 0.5


@dataclass(frozen=True)
class Question:
    text: str
    kind: str  # "keyword" or "paraphrase"
    answer: int  # index of the answering turn in its conversation's `turns`


@dataclass
class Conversation:
    name: str
    turns: list[str] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)


# Each fact: slots to fill, the person's turn, the assistant's reply, a keyword question and a
# paraphrase question (the paraphrase shares no content word with the person's turn).
_FACTS: list[dict[str, object]] = [
    {"slots": {"breed": ["beagle", "poodle", "dachshund", "labrador", "terrier"],
               "pet": ["Biscuit", "Pepper", "Maple", "Noodle", "Ziggy"], "month": ["May", "June", "March"]},
     "say": "We adopted a {breed} puppy in {month} and named her {pet}; she already chews every shoe.",
     "decoy": "My colleague's {breed} puppy {pet} ran off in the park in {month}.",
     "reply": "A {breed} puppy, how exciting! Puppies do love shoes.",
     "keyword": "What did we name the {breed} puppy?",
     "paraphrase": "What is my dog called?"},
    {"slots": {"kind": ["Siamese", "Persian", "tabby", "ginger"], "pet": ["Mochi", "Luna", "Oscar", "Tofu"]},
     "say": "Our {kind} kitten {pet} sleeps on the radiator all afternoon and purrs like an engine.",
     "decoy": "The {kind} cat at the corner café, {pet}, ignores everyone but the owner.",
     "reply": "That sounds like a very contented {kind}!",
     "keyword": "Where does the {kind} kitten sleep?",
     "paraphrase": "Which feline pet do I have?"},
    {"slots": {"job": ["nurse", "data analyst", "architect", "pharmacist", "teacher"],
               "company": ["Northwind", "Brightwater", "Oakridge", "Kestrel Labs"], "month": ["April", "September"]},
     "say": "I finally got the offer: from {month} I will be a {job} at {company}.",
     "decoy": "My friend turned down an offer to be a {job} at {company} in {month}.",
     "reply": "Congratulations on the offer from {company}!",
     "keyword": "Which company made me the {job} offer?",
     "paraphrase": "Where am I going to be employed?"},
    {"slots": {"city": ["Lisbon", "Kyoto", "Montreal", "Cape Town", "Reykjavik"],
               "relative": ["grandmother", "aunt", "cousin", "godfather"]},
     "say": "For the holidays we are flying to {city} to stay with my {relative}.",
     "decoy": "My {relative} went to {city} last year and complained about the weather.",
     "reply": "{city} for the holidays sounds wonderful.",
     "keyword": "Who are we staying with in {city}?",
     "paraphrase": "Where is my vacation trip going?"},
    {"slots": {"instrument": ["cello", "violin", "saxophone", "piano", "trumpet"]},
     "say": "I practise the {instrument} every evening now, and my teacher says I am ready for a recital.",
     "decoy": "My nephew gave up the {instrument} after two lessons.",
     "reply": "A recital already! Your {instrument} practice is paying off.",
     "keyword": "How often do I practise the {instrument}?",
     "paraphrase": "What musical instrument am I learning to play?"},
    {"slots": {"allergen": ["peanuts", "shellfish", "sesame", "hazelnuts"]},
     "say": "Please remember I am allergic to {allergen}; even a trace makes my throat swell.",
     "decoy": "My flatmate cannot stand the taste of {allergen}.",
     "reply": "Noted: no {allergen}, ever.",
     "keyword": "What am I allergic to, the {allergen}?",
     "paraphrase": "Which food must I avoid for medical reasons?"},
    {"slots": {"sibling": ["sister", "brother"], "name": ["Anna", "Tomas", "Priya", "Kenji", "Maren"]},
     "say": "My {sibling} {name} just had twins, a boy and a girl, born on a stormy night.",
     "decoy": "My neighbour {name} says her {sibling} is expecting a baby in spring.",
     "reply": "Twins! Please pass on my congratulations to {name}.",
     "keyword": "Which of my relatives had twins, {name}?",
     "paraphrase": "Who in my family became a parent recently?"},
    {"slots": {"city": ["Berlin", "Chicago", "Valencia", "Osaka"], "time": ["4 hours 12 minutes",
                                                                            "3 hours 58 minutes"]},
     "say": "I ran my first marathon in {city} and finished in {time}, legs like jelly.",
     "decoy": "A friend ran the {city} half marathon in {time} without training.",
     "reply": "Finishing a marathon in {time} is a real achievement.",
     "keyword": "What was my marathon time in {city}?",
     "paraphrase": "How long did the long-distance race take me?"},
    {"slots": {"old": ["Fiat", "Volvo", "Peugeot"], "new": ["Nissan Leaf", "Renault Zoe", "Hyundai Kona"]},
     "say": "My old {old} broke down again, so I bought a second-hand electric {new}.",
     "decoy": "My brother wants to sell his {old} and buy a {new}.",
     "reply": "An electric {new} should be cheaper to run than the {old}.",
     "keyword": "What did I buy after the {old} broke down?",
     "paraphrase": "What vehicle do I drive now?"},
    {"slots": {"street": ["Linden Street", "Harbour Road", "Elm Terrace", "Mill Lane"]},
     "say": "Next month we move into a flat on {street}, right by the river.",
     "decoy": "My boss lives in a big house on {street}.",
     "reply": "A flat by the river on {street}, lovely.",
     "keyword": "Which street is the new flat on, {street}?",
     "paraphrase": "What will my new home address be?"},
    {"slots": {"book": ["The Remains of the Day", "Middlemarch", "Never Let Me Go", "Beloved"]},
     "say": "I just finished reading {book}; the ending made me cry on the train.",
     "decoy": "My book club is reading {book} next month, but I have not started it.",
     "reply": "{book} has stayed with many readers.",
     "keyword": "What did I think of {book}?",
     "paraphrase": "Which novel moved me to tears?"},
    {"slots": {"language": ["Portuguese", "Japanese", "Polish", "Turkish"]},
     "say": "I take {language} lessons twice a week so I can talk with my in-laws.",
     "decoy": "My manager speaks fluent {language} from her years abroad.",
     "reply": "Learning {language} for your in-laws is a kind thing to do.",
     "keyword": "Why am I taking {language} lessons?",
     "paraphrase": "Which foreign tongue am I studying?"},
    {"slots": {"date": ["the 3rd of August", "the 19th of February", "the 27th of November"],
               "age": ["thirty", "forty", "twenty-five"]},
     "say": "My birthday is on {date}; I am turning {age} and want a quiet dinner.",
     "decoy": "My best friend's birthday is on {date}; she is turning {age}.",
     "reply": "A quiet dinner for turning {age}, noted.",
     "keyword": "When is my birthday?",
     "paraphrase": "On what date was I born?"},
    {"slots": {"sport": ["badminton", "volleyball", "table tennis", "water polo"], "day": ["Tuesdays", "Thursdays"]},
     "say": "I joined a {sport} club that plays on {day} at the community hall.",
     "decoy": "My cousin plays {sport} on {day} and keeps getting injured.",
     "reply": "A {sport} club on {day}, what fun.",
     "keyword": "When does my {sport} club play?",
     "paraphrase": "Which team game did I take up?"},
]

# Small talk: reuses the facts' vocabulary on purpose (distractors for keyword search).
_SMALL_TALK: list[tuple[str, str]] = [
    ("My neighbour's dog barked all night again, so I barely slept.", "That sounds exhausting. Earplugs?"),
    ("A colleague of mine just got a new job offer and is leaving.", "Changes at work can be unsettling."),
    ("The weather has been grey and rainy all week.", "Grey weeks are hard. Any plans for the weekend?"),
    ("I cooked a big pot of lentil soup for the week.", "Lentil soup is a great make-ahead meal."),
    ("My friend is flying to a conference and asked me to water her plants.", "Kind of you to help."),
    ("The train was late twice this week.", "Late trains make for long days."),
    ("I watched a documentary about octopuses last night.", "Octopuses are remarkably clever."),
    ("I need to remember to call the plumber about the kitchen sink.", "Shall I remind you tomorrow?"),
    ("The cat next door keeps sitting on our car bonnet.", "Cats love a warm bonnet."),
    ("I am thinking about repainting the living room green.", "Green can make a room feel calm."),
    ("We had friends over and played board games until midnight.", "Sounds like a fun evening."),
    ("My phone screen cracked when I dropped it on the stairs.", "Repair shops can often fix that quickly."),
    ("I tried a new recipe with chickpeas and spinach.", "Chickpeas and spinach go well together."),
    ("Work has been busy; I stayed late three evenings in a row.", "Make sure you rest this weekend."),
    ("I finally cleaned out the garage on Sunday.", "That must feel good to have done."),
    ("My cousin sent photos from her holiday by the sea.", "Seaside photos are always cheerful."),
    ("The library had a sale of old books for one euro each.", "A bargain for readers!"),
    ("I am trying to drink more water during the day.", "A bottle on the desk helps."),
    ("Our street had a power cut for two hours yesterday.", "Hopefully nothing in the freezer thawed."),
    ("I went for a long walk by the river this morning.", "Morning walks are a good start to the day."),
    ("The kids next door started learning the drums.", "That must be lively."),
    ("I forgot my umbrella and got soaked on the way home.", "Hot tea and dry socks, then."),
    ("We are thinking about getting a pet some day.", "Pets are a big commitment, but rewarding."),
    ("My manager asked me to give a presentation on Friday.", "You will do well; practise it once aloud."),
]

_DECOY_REPLIES = ["Oh, really?", "I see.", "Interesting!", "Ha, that figures.", "Good to know."]

_PEOPLE = ["Maria", "Jonas", "Aiko", "Dev", "Sofia", "Liam", "Chen", "Amara", "Pavel", "Nora", "Omar", "Ines",
           "Hugo", "Yuki", "Zara", "Felix"]


def _other_values(slots: dict[str, list[str]], values: dict[str, str], rng: random.Random) -> dict[str, str]:
    """Values for a decoy: different from the fact's wherever the slot has another option."""
    return {name: rng.choice([o for o in options if o != values[name]] or options) for name, options in slots.items()}


def recall_set(seed: int = 17, conversations: int = CONVERSATIONS, facts: int = FACTS_PER_CONVERSATION,
               small_talk: int = SMALL_TALK_PER_CONVERSATION, decoys: float = DECOY_SHARE) -> list[Conversation]:
    """The conversations, each with its turns (person and assistant alternating, as
    "Name: text" / "Assistant: text") and its questions (half keyword, half paraphrase).
    `decoys`: the share of facts that also get a decoy exchange (someone else, same topic)."""
    if facts > len(_FACTS) or small_talk > len(_SMALL_TALK):
        raise ValueError(f"at most {len(_FACTS)} facts and {len(_SMALL_TALK)} small-talk exchanges per conversation")
    rng = random.Random(seed)
    out = []
    for c in range(conversations):
        person = _PEOPLE[c % len(_PEOPLE)] + ("" if c < len(_PEOPLE) else f" {c // len(_PEOPLE) + 1}")
        conv = Conversation(name=f"conv-{c:02d}")
        chosen = rng.sample(range(len(_FACTS)), facts)
        values = {i: {name: rng.choice(options) for name, options in _slots(i).items()} for i in chosen}
        talk = rng.sample(_SMALL_TALK, small_talk)
        # exchanges of two turns each, in a random order: facts, decoys, small talk
        exchanges: list[tuple[str, int]] = [("fact", i) for i in chosen] + [("talk", i) for i in range(small_talk)]
        exchanges += [("decoy", i) for i in chosen if rng.random() < decoys]
        rng.shuffle(exchanges)
        answers: dict[int, int] = {}
        for what, i in exchanges:
            if what == "talk":
                said, reply = talk[i]
                conv.turns += [f"{person}: {said}", f"Assistant: {reply}"]
            elif what == "decoy":
                other = _other_values(_slots(i), values[i], rng)
                conv.turns += [f"{person}: {_FACTS[i]['decoy']}".format(**other),
                               f"Assistant: {rng.choice(_DECOY_REPLIES)}"]
            else:
                answers[i] = len(conv.turns)
                conv.turns += [f"{person}: {_FACTS[i]['say']}".format(**values[i]),
                               f"Assistant: {_FACTS[i]['reply']}".format(**values[i])]
        for j, i in enumerate(chosen):
            kind = "keyword" if (c + j) % 2 == 0 else "paraphrase"
            conv.questions.append(Question(str(_FACTS[i][kind]).format(**values[i]), kind, answers[i]))
        out.append(conv)
    return out


def _slots(fact: int) -> dict[str, list[str]]:
    slots = _FACTS[fact]["slots"]
    assert isinstance(slots, dict)
    return slots


def describe(conversations: list[Conversation]) -> dict[str, int]:
    """Counts for a report: conversations, turns, questions by kind."""
    questions = [q for c in conversations for q in c.questions]
    return {"conversations": len(conversations), "turns": sum(len(c.turns) for c in conversations),
            "questions": len(questions), "keyword_questions": sum(q.kind == "keyword" for q in questions),
            "paraphrase_questions": sum(q.kind == "paraphrase" for q in questions)}
