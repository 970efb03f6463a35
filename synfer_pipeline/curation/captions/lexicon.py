"""The words a caption uses to assert an expression, and the cues that cancel them.

`EXPRESSION_TERMS` maps each canonical expression (see `vocab.EXPRESSIONS`) to the words and phrases that assert it,
each with a weight: 1.0 for an unambiguous name of the emotion, less for cues that also occur in captions of other
classes (a "slight smile" is common in neutral FEText captions, "calm" often describes the gaze rather than the
expression). Phrases are lower case; words inside a phrase are separated by single spaces.

The remaining tables are the grammar `validation.parse_expression` reads with: negation cues and what ends their
scope, the assertion frames that mark the caption's main claim, and the face words that show a caption is about a face.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from synfer_pipeline.vocab import EXPRESSIONS

# Weight of a word that names the emotion outright; the lighter weights below are cues shared with other classes.
FULL = 1.0
CUE = 0.75
WEAK = 0.5
TRACE = 0.25

EXPRESSION_TERMS: dict[str, dict[str, float]] = {
    "neutral": {
        "neutral": FULL, "neutrality": FULL, "expressionless": FULL, "impassive": FULL, "emotionless": FULL,
        "unemotional": FULL, "deadpan": FULL, "blank": WEAK, "blankly": CUE, "blank stare": CUE, "poker face": FULL, "straight face": CUE,
        "no particular emotion": FULL, "no particular expression": FULL, "no emotion": FULL, "no visible emotion": FULL,
        "no strong emotion": FULL, "no apparent emotion": FULL, "lack of emotion": FULL, "lack of expression": FULL,
        "without emotion": FULL, "devoid of emotion": FULL, "free of emotion": FULL,
        "composed": CUE, "composure": CUE, "stoic": CUE, "placid": CUE, "serene": WEAK, "calm": WEAK,
        "calmness": WEAK, "serious": WEAK, "thoughtful": TRACE, "pensive": TRACE, "indifferent": WEAK,
    },
    "happy": {
        "happy": FULL, "happiness": FULL, "happily": FULL, "joy": FULL, "joyful": FULL, "joyous": FULL,
        "cheerful": FULL, "cheerfulness": FULL, "delighted": FULL, "delight": FULL, "elated": FULL,
        "gleeful": FULL, "glee": FULL, "jubilant": FULL, "ecstatic": FULL, "merry": FULL, "glad": FULL,
        "pleased": CUE, "contented": CUE, "amused": CUE, "amusement": CUE, "beaming": FULL,
        "smiling": CUE, "smile": CUE, "smiles": CUE, "smiled": CUE, "grin": CUE, "grinning": CUE, "grins": CUE,
        "laughing": FULL, "laughter": FULL, "laugh": CUE, "laughs": CUE,
        # A faint smile is a neutral face's most common detail in FEText; it must not outvote the stated label.
        "slight smile": TRACE, "faint smile": TRACE, "subtle smile": TRACE, "small smile": TRACE,
        "hint of a smile": TRACE, "trace of a smile": TRACE, "gentle smile": WEAK, "soft smile": WEAK,
    },
    "sad": {
        "sad": FULL, "sadness": FULL, "sadly": FULL, "sorrow": FULL, "sorrowful": FULL, "melancholy": FULL,
        "melancholic": FULL, "downcast": FULL, "unhappy": FULL, "unhappiness": FULL, "gloomy": FULL, "gloom": FULL,
        "crying": FULL, "tearful": FULL, "weeping": FULL, "grief": FULL, "grieving": FULL, "mournful": FULL,
        "despair": FULL, "despondent": FULL, "dejected": FULL, "miserable": FULL, "heartbroken": FULL,
        "depressed": FULL, "upset": CUE, "forlorn": FULL, "disappointed": CUE, "disappointment": CUE,
        "sullen": CUE, "glum": FULL, "somber": CUE, "sombre": CUE, "tears": CUE, "fights back tears": FULL,
    },
    "surprise": {
        "surprise": FULL, "surprised": FULL, "astonished": FULL, "astonishment": FULL, "amazed": FULL,
        "amazement": FULL, "shocked": FULL, "shock": FULL, "startled": FULL, "stunned": FULL,
        "astounded": FULL, "awestruck": FULL, "in awe": CUE, "dumbfounded": FULL, "flabbergasted": FULL,
        "disbelief": CUE, "wide-eyed": WEAK, "taken aback": FULL, "caught off guard": CUE,
    },
    "fear": {
        "fear": FULL, "fearful": FULL, "fearfulness": FULL, "afraid": FULL, "scared": FULL, "frightened": FULL,
        "terrified": FULL, "terror": FULL, "anxious": FULL, "anxiety": FULL, "panic": FULL, "panicked": FULL,
        "panicky": FULL, "horrified": FULL, "horror": CUE, "dread": FULL, "alarmed": FULL, "apprehensive": FULL,
        "apprehension": FULL, "nervous": CUE, "worried": CUE, "worry": CUE, "uneasy": CUE, "petrified": FULL,
    },
    "disgust": {
        "disgust": FULL, "disgusted": FULL, "repulsed": FULL, "repulsion": FULL, "revolted": FULL,
        "revulsion": FULL, "grossed out": FULL, "repelled": FULL, "repugnance": FULL, "nauseated": FULL,
        "aversion": FULL, "distaste": FULL, "loathing": CUE, "sickened": FULL,
    },
    "anger": {
        "angry": FULL, "anger": FULL, "angrily": FULL, "furious": FULL, "fury": FULL, "irritated": FULL,
        "irritation": FULL, "annoyed": FULL, "annoyance": FULL, "rage": FULL, "enraged": FULL, "raging": FULL,
        "hostile": FULL, "hostility": FULL, "mad": CUE, "irate": FULL, "livid": FULL, "outraged": FULL,
        "frustrated": CUE, "frustration": CUE, "indignant": CUE, "resentful": CUE, "resentment": CUE,
        "glaring": CUE, "glare": WEAK, "scowl": CUE, "scowling": CUE, "aggressive": CUE, "aggression": CUE,
        "wrath": FULL, "fuming": FULL, "stern": WEAK,
    },
    "contempt": {
        "contempt": FULL, "contemptuous": FULL, "disdain": FULL, "disdainful": FULL, "scorn": FULL,
        "scornful": FULL, "smirk": FULL, "smirking": FULL, "smirks": FULL, "sneer": FULL, "sneering": FULL,
        "condescending": CUE, "condescension": CUE, "derision": CUE, "derisive": CUE, "mocking": CUE,
    },
}

# Words that open a negation scope ("lack of joy", "not smiling", "neither happy nor sad").
NEGATION_CUES: tuple[str, ...] = (
    "lack of", "lacks", "lacking", "rather than", "instead of", "absence of", "absent of", "free of", "devoid of",
    "not", "no", "never", "cannot", "without", "neither", "nor", "hardly", "barely", "none", "nothing",
)

# Where a negation scope ends: sentence punctuation and contrastive connectives ("not happy, but calm").
SCOPE_BREAKERS: tuple[str, ...] = ("but", "however", "yet", "while", "whereas", "although", "though", "instead")

# How far (in words after the cue) a negation reaches: "no visible sign of any anger" is 4 words.
NEGATION_REACH_WORDS = 5

# Verbs and nouns of the caption's main claim: "is displaying a happy facial expression",
# "the expression conveys sadness", "she looks surprised".
DISPLAY_VERBS: tuple[str, ...] = (
    "displaying", "displays", "display", "showing", "shows", "show", "exhibiting", "exhibits", "exhibit",
    "has", "have", "having", "with", "wearing", "wears", "bearing", "bears", "making", "makes",
    "expressing", "expresses", "portraying", "portrays", "conveying", "conveys", "presenting", "presents",
)
EXPRESSION_NOUNS: tuple[str, ...] = (
    "expression", "expressions", "look", "face", "demeanor", "demeanour", "appearance", "mood", "emotion",
    "countenance",
)
CONVEY_VERBS: tuple[str, ...] = (
    "conveys", "convey", "conveying", "suggests", "suggest", "suggesting", "indicates", "indicate", "indicating",
    "reflects", "reflect", "reflecting", "expresses", "express", "communicates", "signals", "reveals", "shows",
    "displays", "is", "was", "of",
)
APPEAR_VERBS: tuple[str, ...] = (
    "appears", "appear", "appearing", "looks", "look", "looking", "seems", "seem", "seeming", "feels", "feel",
    "feeling",
)
# Subjects whose "is"/"are" + term asserts the expression ("she is happy"); "the background is blank" does not.
PERSON_SUBJECTS: tuple[str, ...] = (
    "she", "he", "they", "person", "man", "woman", "boy", "girl", "child", "subject", "individual",
)

# Words that show a caption talks about a face (the no_face_content check), besides the expression terms.
FACE_WORDS: tuple[str, ...] = (
    "face", "faces", "facial", "expression", "expressions", "eye", "eyes", "eyelid", "eyelids", "lid", "lids",
    "brow", "brows", "eyebrow", "eyebrows", "forehead", "nose", "nostril", "nostrils", "cheek", "cheeks",
    "cheekbones", "mouth", "lip", "lips", "teeth", "jaw", "chin", "gaze", "stare", "staring", "glance", "frown",
    "frowning", "wrinkles", "wrinkled", "dimples", "features",
)


def term_table() -> dict[str, tuple[str, float]]:
    """Every phrase of `EXPRESSION_TERMS` mapped to (canonical expression, weight); a phrase belongs to one class."""
    table: dict[str, tuple[str, float]] = {}
    for expression, terms in EXPRESSION_TERMS.items():
        for phrase, weight in terms.items():
            if phrase in table:
                raise ValueError(f"lexicon phrase {phrase!r} is listed under two expressions")
            table[phrase] = (expression, weight)
    return table


def alternation(phrases: Iterable[str]) -> str:
    """A regex matching any of `phrases` literally, factored as a prefix tree.

    Python's `re` tries the branches of a flat alternation one by one at every position; a tree shares the work
    of common prefixes, which keeps scanning a caption for ~300 phrases to a few microseconds.
    """
    trie: dict = {}
    for phrase in phrases:
        node = trie
        for char in phrase:
            node = node.setdefault(char, {})
        node[""] = {}
    return _trie_pattern(trie)


def _trie_pattern(node: dict) -> str:
    branches = [re.escape(char) + _trie_pattern(child) for char, child in sorted(node.items()) if char]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    if "" in node:
        # A phrase ends here but longer ones continue: try the longer first, the word boundary decides.
        return body + "?" if len(branches) == 1 and len(branches[0]) == 1 else "(?:" + body + ")?"
    return body


TERMS: dict[str, tuple[str, float]] = term_table()
TERM_RE = re.compile(rf"\b(?:{alternation(TERMS)})\b")
# Single-word terms, for the negation walk that decides whether "no anger, fear or disgust" still negates "disgust".
TERM_WORDS: frozenset[str] = frozenset(t for t in TERMS if " " not in t)
CUE_WORDS: frozenset[str] = frozenset(c for c in NEGATION_CUES if " " not in c)
CUE_PAIRS: frozenset[tuple[str, str]] = frozenset(tuple(c.split(" ")) for c in NEGATION_CUES if " " in c)
BREAKER_WORDS: frozenset[str] = frozenset(SCOPE_BREAKERS)
# Words whose absence proves a caption has no negation at all (besides "n't"): the common case skips the walk.
CUE_TRIGGERS: frozenset[str] = CUE_WORDS | frozenset(first for first, _ in CUE_PAIRS)

# The frame just before a term, matched on the normalised text and anchored at the term. Groups, one per frame:
#   face:    "her gaze is calm" describes the gaze, not the expression (no assertion weight)
#   convey:  "the overall expression conveys a sense of sadness"
#   appear:  "she looks surprised", "the woman appears to be quite angry"
#   display: "is displaying a happy ..." (an assertion when an expression noun follows the term)
#   bare:    "showing signs of fear", "expressing joy"
#   hedge:   "a hint of sadness" in passing (but "the expression conveys a hint of sadness" is a convey frame:
#            the search returns the leftmost frame, which is the longer one)
_MODIFIERS = (
    r"(?:(?:[a-z]+ly|quite|very|rather|somewhat|a bit|a little|more|overall|mostly|clear|strong|mild|pure|deep) )"
)
_FRAMES_BEFORE = (
    r"(?P<face>(?:gaze|eyes?|eyebrows?|brows?|lips|mouth|nose|cheeks?|stare|eyelids|lids|jaw|forehead"
    rf"|background) (?:is|are|appears?|looks?|seems?) (?:to be )?{_MODIFIERS}{{0,2}})$",
    rf"(?P<convey>(?:expression|face|look|demeanou?r|appearance|features|countenance) (?:that |which )?"
    rf"(?:{alternation(CONVEY_VERBS)}) (?:(?:an?|one of) )?"
    r"(?:(?:sense|feeling|state|hint|mix|mixture|air|touch|impression|look|emotion) of )?"
    rf"(?:an? )?{_MODIFIERS}{{0,2}})$",
    rf"(?P<appear>(?:(?:{alternation(APPEAR_VERBS)})|(?:{alternation(PERSON_SUBJECTS)}) (?:is|are|was|were)) "
    rf"(?:to be )?{_MODIFIERS}{{0,2}})$",
    rf"(?P<display>(?:{alternation(DISPLAY_VERBS)}) (?:an?|the|her|his|their|its) (?:[a-z-]+ ){{0,2}})$",
    rf"(?P<bare>(?:{alternation(DISPLAY_VERBS)}) (?:(?:clear|obvious|visible|strong|some) )?(?:signs? of )?)$",
    r"(?P<hedge>(?:hint|trace|touch|tinge|glimmer|flicker|suggestion) of (?:an? )?)$",
)
# Every frame starts at a word boundary; testing it once, outside the alternation, makes the search 3x faster.
FRAME_BEFORE_RE = re.compile(r"\b(?:" + "|".join(_FRAMES_BEFORE) + ")")
# "a happy facial expression", "the neutral look": the term qualifies the expression itself.
EXPRESSION_AFTER_RE = re.compile(rf" (?:facial |emotional |overall )?(?:{alternation(EXPRESSION_NOUNS)})\b")

FACE_RE = re.compile(rf"\b(?:{alternation(FACE_WORDS)})\b")


# Every class of the canonical vocabulary must be assertable, or validation could never accept it.
assert set(EXPRESSION_TERMS) == set(EXPRESSIONS), "lexicon classes must match vocab.EXPRESSIONS"
