"""TemplateCaptioner: FEText-style captions written from a label and an AU list, no language model involved.

The paper captions FEText with a multimodal LLM (ShareGPT-4V). The demo profile runs without one, so this module
fills the caption slots of the supplementary's examples (expression, eyes, nose, cheeks, mouth, eyebrows, gaze,
overall impression) from templates: each action unit present is described at its facial part, parts without an
AU get a neutral phrase, and a seeded RNG picks among alternative phrasings so captions are not all identical.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from synfer_pipeline.vocab import canonical_expression

# Adjective used in "displaying a(n) X facial expression" and noun used in "the expression conveys a sense of X".
_ADJECTIVE = {
    "neutral": "neutral", "happy": "happy", "sad": "sad", "surprise": "surprised", "fear": "fearful",
    "disgust": "disgusted", "anger": "angry", "contempt": "contemptuous",
}
_NOUN = {
    "neutral": "neutrality", "happy": "happiness", "sad": "sadness", "surprise": "surprise", "fear": "fear",
    "disgust": "disgust", "anger": "anger", "contempt": "contempt",
}
# Possessive pronoun per subject noun; unknown subjects are referred to as "their".
_POSSESSIVE = {"woman": "her", "girl": "her", "lady": "her", "man": "his", "boy": "his", "gentleman": "his"}

# Phrases per action unit, written with {p} for the possessive pronoun. Lexicon words (smile, calm, ...) are kept
# out of them on purpose: the label is stated once in the opening and once in the closing sentence, nowhere else.
_EYE_AUS = {
    "AU5": (
        "{P} eyes are wide open, showing the whites above the irises",
        "{P} upper eyelids are raised, widening the eyes",
    ),
    "AU7": ("{P} eyelids are tightened, narrowing the eyes", "{P} lower lids are tense and pulled up"),
}
_EYES_BOTH = (
    "{P} eyes are wide open while the lower lids are tense",
    "{P} eyes are opened wide, the upper lids raised and the lower lids tightened",
)
_EYES_NEUTRAL = (
    "{P} eyes are open and focused", "{P} eyes are open with relaxed lids", "{P} eyes are open and attentive",
)
_NOSE = {"AU9": ("{p} nose is wrinkled", "the skin on {p} nose is wrinkled upward")}
_NOSE_NEUTRAL = ("{p} nose is straight", "{p} nose is smooth", "{p} nose is straight and smooth")
_CHEEKS = {"AU6": ("{p} cheeks are raised", "{p} cheeks are lifted, pushing up the skin below the eyes")}
_CHEEKS_NEUTRAL = ("{p} cheeks are smooth", "{p} cheeks are slightly full", "{p} cheeks are at rest")
_MOUTH = {
    "AU12": ("the corners of {p} lips are pulled up", "{p} lip corners are drawn upward"),
    "AU15": ("the corners of {p} mouth are turned down", "{p} lip corners are pulled downward"),
    "AU16": ("{p} lower lip is pulled down", "{p} lower lip is drawn down"),
    "AU20": ("{p} lips are stretched sideways", "{p} lips are pulled wide toward the ears"),
    "AU23": ("{p} lips are tightened", "{p} lips are pressed tight and thin"),
    "AU25": ("{p} lips are parted", "{p} lips are slightly apart"),
    "AU26": ("{p} jaw has dropped, leaving {p} mouth open", "{p} jaw is lowered and {p} mouth hangs open"),
}
_MOUTH_NEUTRAL = ("{p} mouth is closed", "{p} lips are closed and at rest", "{p} mouth is gently closed")
# Eyebrow phrases keyed by the set of brow AUs present (AU1 inner raiser, AU2 outer raiser, AU4 lowerer).
_BROWS = {
    frozenset({"AU1"}): ("the inner corners of {p} eyebrows are raised", "{p} inner brows are lifted"),
    frozenset({"AU2"}): ("the outer parts of {p} eyebrows are raised", "{p} outer brows are lifted"),
    frozenset({"AU4"}): ("{p} eyebrows are lowered and furrowed", "{p} brows are drawn down and together"),
    frozenset({"AU1", "AU2"}): ("{p} eyebrows are raised high", "{p} eyebrows are lifted into arches"),
    frozenset({"AU1", "AU4"}): (
        "{p} eyebrows are drawn together with the inner corners raised",
        "{p} brows are knit, their inner ends lifted",
    ),
    frozenset({"AU2", "AU4"}): ("{p} brows are lowered at the center and lifted at the ends",),
    frozenset({"AU1", "AU2", "AU4"}): (
        "{p} eyebrows are raised and pulled together", "{p} brows are lifted and drawn in",
    ),
}
_BROWS_NEUTRAL = ("{p} eyebrows are relaxed", "{p} eyebrows are level", "{p} eyebrows rest in a natural position")
_GAZE = (
    "{p} gaze is directed straight ahead", "{p} gaze is directed at the camera",
    "{p} gaze is turned slightly to the side", "{p} gaze is fixed on a point in front of {o}",
)
_OPENINGS = (
    "The {s} in the image is displaying {a} {x} facial expression.",
    "The {s} in the image is showing {a} {x} facial expression.",
    "The {s} in this picture has {a} {x} expression.",
)
_CLOSINGS = (
    "Overall, the expression conveys a sense of {n}.",
    "The overall expression suggests {n}.",
    "Taken together, the face shows {a} {x} expression.",
)
_OBJECT = {"her": "her", "his": "him", "their": "them"}
_KNOWN_AUS = frozenset({*_EYE_AUS, *_NOSE, *_CHEEKS, *_MOUTH, *(au for key in _BROWS for au in key)})


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _base_au(au: str) -> str:
    """'aul12' or 'AUR12' -> 'AU12': a one-sided unit is described like the bilateral one."""
    au = au.strip().upper()
    if au.startswith(("AUL", "AUR")):
        return "AU" + au[3:]
    return au


class TemplateCaptioner:
    """A label-and-AU TEMPLATE captioner: the demo's honest stand-in for the paper's multimodal LLM.

    It does not look at the image. It writes an FEText-style paragraph (opening claim, eyes, nose, cheeks, mouth,
    eyebrows, gaze, overall impression) from the expression label and the AUs detected for the image; every AU it
    knows (1, 2, 4, 5, 6, 7, 9, 12, 15, 16, 20, 23, 25, 26, and their L/R variants) is described at its facial part,
    other AUs are ignored. Lineage records must name it as a template (see `describe`).
    """

    name = "template-captioner"
    version = "1"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def describe(self) -> dict:
        """Settings for lineage records: name, kind ('template'), version, seed and the AUs it describes."""
        known = sorted(_KNOWN_AUS, key=lambda a: int(a[2:]))
        return {"name": self.name, "kind": "template", "version": self.version, "seed": self.seed, "aus": known}

    def caption(self, expression: str, aus: Sequence[str], subject: str = "person", key: str | None = None) -> str:
        """One caption for an image labelled `expression` with action units `aus` (e.g. ['AU6', 'AU12']).

        subject: the noun for the face ("person", "man", "woman", ...); "man"/"woman" also pick his/her.
        key: a stable id of the image; with the seed it fixes the phrasing, so the same inputs give the same caption
        in any batch and any order. Without a key the inputs themselves are the key. AUs it has no phrase for
        are ignored (they change nothing, not even the phrasing).
        """
        label = canonical_expression(expression)
        present = {_base_au(a) for a in aus} & _KNOWN_AUS
        rng = random.Random(self._rng_seed(label, present, subject, key))
        pronoun = _POSSESSIVE.get(subject.strip().lower(), "their")
        adjective = _ADJECTIVE[label]
        fields = {
            "p": pronoun, "P": pronoun.capitalize(), "o": _OBJECT[pronoun],
            "s": subject, "a": _article(adjective), "x": adjective, "n": _NOUN[label],
        }
        sentences = [
            rng.choice(_OPENINGS),
            _sentence(_eyes(present, rng), _part(_NOSE, _NOSE_NEUTRAL, present, rng)),
            *_cheeks_and_mouth(_part(_CHEEKS, _CHEEKS_NEUTRAL, present, rng), _mouth(present, rng)),
            _sentence(_brows(present, rng), rng.choice(_GAZE)),
            rng.choice(_CLOSINGS),
        ]
        return " ".join(_capitalised(s.format(**fields)) for s in sentences)

    def _rng_seed(self, label: str, present: set[str], subject: str, key: str | None) -> int:
        # A content hash, not Python's hash(): stable across processes, so reruns reproduce the captions.
        material = f"{self.seed}|{key}|{label}|{','.join(sorted(present))}|{subject}"
        return int.from_bytes(hashlib.blake2b(material.encode(), digest_size=8).digest(), "big")


def _sentence(first: str, second: str) -> str:
    return first + ", and " + second + "."


def _capitalised(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def _eyes(present: set[str], rng: random.Random) -> str:
    if {"AU5", "AU7"} <= present:
        return rng.choice(_EYES_BOTH)
    for au, phrases in _EYE_AUS.items():
        if au in present:
            return rng.choice(phrases)
    return rng.choice(_EYES_NEUTRAL)


def _part(table: dict[str, tuple[str, ...]], neutral: tuple[str, ...], present: set[str], rng: random.Random) -> str:
    for au, phrases in table.items():
        if au in present:
            return rng.choice(phrases)
    return rng.choice(neutral)


def _mouth(present: set[str], rng: random.Random) -> list[str]:
    phrases = [rng.choice(options) for au, options in _MOUTH.items() if au in present]
    if "AU26" in present and "AU25" in present:
        # A dropped jaw already parts the lips; saying both reads oddly.
        phrases = [p for p in phrases if p not in _MOUTH["AU25"]]
    return phrases or [rng.choice(_MOUTH_NEUTRAL)]


def _cheeks_and_mouth(cheeks: str, mouth: list[str]) -> list[str]:
    """One sentence for cheeks and a one-phrase mouth; a mouth with several movements gets its own sentence."""
    if len(mouth) == 1:
        return [_sentence(cheeks, mouth[0])]
    return [cheeks + ".", ", ".join(mouth[:-1]) + ", and " + mouth[-1] + "."]


def _brows(present: set[str], rng: random.Random) -> str:
    brow_aus = frozenset(present & {"AU1", "AU2", "AU4"})
    if not brow_aus:
        return rng.choice(_BROWS_NEUTRAL)
    return rng.choice(_BROWS[brow_aus])
