"""Caption validation: the post-processing of FEText captions (SynFER main paper, Sec. 4.2.1).

A caption from the multimodal LLM is kept only if it is a well-formed description of a face and the expression it
asserts agrees with the image's expression label. The paper reports that this filter raised caption/expression
alignment on 100 hand-checked pairs from 62% to 81%.

Reason codes of a rejected caption (stable, machine-readable). What a caption says is judged before how it says it:
the first failure in this order is reported, so a short or cut-off caption that names the wrong expression is
reported as a mismatch, and length never stands in for correctness.

- `empty`: nothing but whitespace.
- `garbage`: mostly non-letters (markup, numbers, mojibake, another script) or a run-on token of 40+ characters.
- `expression_mismatch:<asserted>!=<expected>`: asserts a different expression than the image's label.
- `no_face_content`: names no face part and no expression.
- `ambiguous_expression`: two expressions are asserted with equal weight.
- `no_expression`: asserts no expression while the image's is known (only with `ValidationRules.require_expression`).
- `too_short` / `too_long`: a fragment of fewer than `min_words` words ("A happy woman.") / more than `max_words`.
  A short sentence that states the expression ("He looks furious, scowling with a clenched jaw.") is kept.
- `truncated`: does not end with sentence punctuation, ends in an ellipsis, or ends on a dangling word ("and.", "the.").
- `repetition`: the same word many times in a row, the same sentence twice, or many repeated n-grams (a decoding loop).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from synfer_pipeline.settings import settings
from synfer_pipeline.vocab import EXPRESSIONS, canonical_expression

from . import lexicon as lx


@dataclass(frozen=True, slots=True)
class ParsedExpression:
    """What a caption says about the expression.

    expression: the asserted canonical class, or None when nothing (or a tie) is asserted.
    scores: weighted evidence per class of `vocab.EXPRESSIONS` (0.0 for classes never mentioned).
    negated: lexicon phrases that occur under a negation ("not smiling" -> "smiling"), in caption order.
    evidence: lexicon phrases that counted, in caption order.
    """

    expression: str | None
    scores: dict[str, float]
    negated: tuple[str, ...]
    evidence: tuple[str, ...]


@settings
class ValidationRules:
    """Thresholds of caption validation; defaults suit FEText-style captions (~60-120 words) and short ones alike.

    require_expression: reject a caption that asserts no expression when the image's expression is known.
      True by default: the filter exists to align text with label, and a caption silent about the expression
      teaches the generator nothing about it. Set False to keep such captions (then only mismatches are rejected).
    max_adjacent_repeats: how often a word may directly repeat itself ("very very") in one caption; a run of four
      identical words is three repeats. max_repeated_ngrams: how many word n-grams (of `ngram_size`) may repeat an
      earlier one; a decoding loop or a duplicated clause exceeds it at once.
    min_expression_score: evidence a class needs to count as asserted (one plain "smiling" is 0.75, a faint
      "slight smile" 0.25, "displaying a sad expression" 3.0).
    """

    min_words: int = 4      # fewer words is a fragment, not a caption
    max_words: int = 300
    min_letter_ratio: float = 0.7
    max_token_chars: int = 40
    ngram_size: int = 4
    max_repeated_ngrams: int = 3
    max_adjacent_repeats: int = 2
    min_sentence_words: int = 3
    min_expression_score: float = 0.75
    require_expression: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.min_words <= self.max_words:
            raise ValueError(f"need 0 < min_words <= max_words, got {self.min_words} and {self.max_words}")
        if self.ngram_size < 2:
            raise ValueError(f"ngram_size must be at least 2, got {self.ngram_size}")


@dataclass(frozen=True, slots=True)
class Verdict:
    """Outcome for one caption: ok, the reason code when rejected (see module docstring), the asserted class."""

    ok: bool
    reason: str | None
    asserted: str | None


DEFAULT_RULES = ValidationRules()

# Weight multipliers of the assertion frames: the caption's explicit claim outweighs incidental words.
ASSERTION_WEIGHT = 3.0
FRAMED_WEIGHT = 2.0
HEDGED_WEIGHT = 0.5
FRAME_WINDOW_CHARS = 48  # the longest frame, "expression that conveys a sense of deep ", is 40
NEGATION_WINDOW_CHARS = 96

_ASCII_LETTERS = frozenset(range(ord("a"), ord("z") + 1)) | frozenset(range(ord("A"), ord("Z") + 1))
_NON_LETTER_BYTES = bytes(b for b in range(256) if b not in _ASCII_LETTERS)
_CLOSERS = "\"')]"
_DANGLING_WORDS = frozenset(
    "and or but nor the a an of with to in on at by from for very their which".split()
)


def _words(caption: str) -> list[str]:
    # Lower case, straight apostrophes, punctuation left attached: joined by single spaces, these words are the
    # normalised text that every pattern of the lexicon is written for.
    return caption.lower().replace("\u2019", "'").split()


def parse_expression(caption: str, min_score: float = DEFAULT_RULES.min_expression_score) -> ParsedExpression:
    """Read which expression `caption` asserts.

    Each lexicon phrase adds its weight to its class, times 3 inside an assertion frame ("is displaying a happy
    facial expression", "the overall expression conveys sadness", "she looks surprised"), times 2 next to an
    expression noun ("the neutral expression"), times 0.5 when hedged in passing ("a hint of anger"). Phrases
    inside a negation scope ("not smiling", "neither happy nor sad", "no sign of anger", "rather than angry") do
    not count. The class with the highest score is asserted if it reaches `min_score` and no other class ties.
    """
    words = _words(caption)
    return _parse(" ".join(words), words, min_score)


def _parse(text: str, words: list[str], min_score: float) -> ParsedExpression:
    scores = dict.fromkeys(EXPRESSIONS, 0.0)
    evidence: list[str] = []
    negated: list[str] = []
    may_negate = "n't" in text or not lx.CUE_TRIGGERS.isdisjoint(words)
    for match in lx.TERM_RE.finditer(text):
        phrase, start = match.group(), match.start()
        if may_negate and _is_negated(text, start):
            negated.append(phrase)
            continue
        expression, weight = lx.TERMS[phrase]
        scores[expression] += weight * _frame_weight(text, start, match.end())
        evidence.append(phrase)
    return ParsedExpression(_asserted(scores, min_score), scores, tuple(negated), tuple(evidence))


def _is_negated(text: str, start: int) -> bool:
    """Whether the term starting at text[start] lies in the scope of a negation cue before it.

    Walks back word by word. The scope reaches `NEGATION_REACH_WORDS` words past the cue, and further through
    coordinated terms ("neither happy nor sad", "no anger, fear or disgust"); sentence punctuation, a contrastive
    word ("but", "while") or a comma/"and" that starts a new clause rather than joining terms closes it.
    """
    before = text[max(0, start - NEGATION_WINDOW_CHARS):start].split(" ")
    words_since_term = 0
    follows_term = True  # the word after the current one is a term (initially: the term being checked)
    for i in range(len(before) - 2, -1, -1):
        word = before[i]
        bare = word.rstrip(",.;:!?")
        if bare != word and (word[-1] != "," or not follows_term):
            return False
        if bare in lx.CUE_WORDS or bare.endswith("n't"):
            return True
        if i > 0 and (before[i - 1], bare) in lx.CUE_PAIRS:
            return True
        if bare in lx.BREAKER_WORDS or (bare == "and" and not follows_term):
            return False
        if bare in lx.TERM_WORDS:
            words_since_term, follows_term = 0, True
            continue
        follows_term = bare in ("or", "and")  # "anger or fear": the conjunction joins terms, keep walking
        if not follows_term:
            words_since_term += 1
            if words_since_term > lx.NEGATION_REACH_WORDS:
                return False
    return False


def _frame_weight(text: str, start: int, end: int) -> float:
    """Multiplier for the term at text[start:end] from the frame around it (1.0 for an incidental mention)."""
    frame = lx.FRAME_BEFORE_RE.search(text, max(0, start - FRAME_WINDOW_CHARS), start)
    kind = frame.lastgroup if frame is not None else None
    if kind == "face":
        return 1.0
    if kind == "hedge":
        return HEDGED_WEIGHT
    if kind == "convey" or kind == "appear":
        return ASSERTION_WEIGHT
    if lx.EXPRESSION_AFTER_RE.match(text, end) is not None:
        return ASSERTION_WEIGHT if kind == "display" else FRAMED_WEIGHT
    return FRAMED_WEIGHT if kind == "bare" else 1.0


def _asserted(scores: dict[str, float], min_score: float) -> str | None:
    best = max(scores, key=scores.__getitem__)
    if scores[best] < min_score or _is_tie(scores, min_score):
        return None
    return best


def _is_tie(scores: dict[str, float], min_score: float) -> bool:
    """Whether two or more classes share the top score and it is high enough to count as asserted."""
    top = max(scores.values())
    return top >= min_score and sum(1 for value in scores.values() if value == top) > 1


def form_reason(caption: str, rules: ValidationRules = DEFAULT_RULES) -> str | None:
    """The well-formedness reason code for `caption` (see module docstring), or None if it is well formed.

    Does not look at the expression; `no_face_content` is decided in `validate_caption`, which has the parse.
    """
    words = _words(caption)
    return _form_reason(caption, " ".join(words), words, rules)


def _unreadable_reason(caption: str, text: str, words: list[str], rules: ValidationRules) -> str | None:
    """`empty` or `garbage`: there is no text to judge."""
    if not words:
        return "empty"
    letters = len(caption.encode("ascii", "ignore").translate(None, _NON_LETTER_BYTES))
    if letters < rules.min_letter_ratio * (len(text) - len(words) + 1):
        return "garbage"
    if max(map(len, words)) > rules.max_token_chars:
        return "garbage"
    return None


def _form_reason(caption: str, text: str, words: list[str], rules: ValidationRules) -> str | None:
    unreadable = _unreadable_reason(caption, text, words, rules)
    if unreadable is not None:
        return unreadable
    if len(words) < rules.min_words:
        return "too_short"
    if len(words) > rules.max_words:
        return "too_long"
    if _is_truncated(text):
        return "truncated"
    if _is_repetitive(words, text, rules):
        return "repetition"
    return None


def _is_truncated(text: str) -> bool:
    tail = text.rstrip(_CLOSERS)
    if not tail or tail[-1] not in ".!?" or tail.endswith("..."):
        return True
    last_word = tail.rsplit(" ", 1)[-1].rstrip(".!?")
    return last_word in _DANGLING_WORDS


def _is_repetitive(words: list[str], text: str, rules: ValidationRules) -> bool:
    # Words keep their punctuation here: splitting on spaces is several times cheaper than a word regex.
    if sum(map(operator.eq, words, words[1:])) > rules.max_adjacent_repeats:
        return True
    sentences = text.rstrip(".!?").replace("! ", ". ").replace("? ", ". ").split(". ")
    if len(set(sentences)) < len(sentences):  # rare: only then look at which sentences repeat
        long_enough = [s for s in sentences if s.count(" ") + 1 >= rules.min_sentence_words]
        if len(set(long_enough)) < len(long_enough):
            return True
    n = rules.ngram_size
    distinct = len(set(zip(*[words[i:] for i in range(n)])))
    return len(words) - n + 1 - distinct > rules.max_repeated_ngrams


def _mentions_face(parsed: ParsedExpression, text: str) -> bool:
    # Weak cues do not count: "a calm blue sea" is not about a face.
    for phrase in parsed.evidence + parsed.negated:
        if lx.TERMS[phrase][1] >= lx.CUE:
            return True
    return lx.FACE_RE.search(text) is not None


def _expected_expression(image_expression: str | None) -> str | None:
    # NaN is how a DataFrame spells a missing label: unknown, like None.
    if image_expression is None or image_expression != image_expression:
        return None
    return canonical_expression(image_expression)


def validate_caption(
    caption: str, image_expression: str | None, rules: ValidationRules = DEFAULT_RULES
) -> Verdict:
    """Check one caption against its image's expression label.

    image_expression: the image's label (any spelling `vocab.canonical_expression` knows), or None (or NaN) when
      unknown; then only well-formedness (and face content) is checked and any asserted expression is accepted.
    An `ambiguous_expression` caption is rejected even with `require_expression=False`: it asserts two classes.
    A caption that is not a string (None, NaN) is rejected as `empty`.
    Returns a Verdict whose `asserted` is the expression the caption asserts (None if rejected for form, or if it
    asserts none). Raises `vocab.UnknownLabelError` for an image label outside the vocabulary.
    """
    expected = _expected_expression(image_expression)
    if not isinstance(caption, str):  # a missing caption (None, or NaN from a DataFrame) is an empty one
        return Verdict(False, "empty", None)
    words = _words(caption)
    text = " ".join(words)
    reason = _unreadable_reason(caption, text, words, rules)
    if reason is not None:
        return Verdict(False, reason, None)
    parsed = _parse(text, words, rules.min_expression_score)
    asserted = parsed.expression
    substantive = _substantive_reason(parsed, text, asserted, expected, rules)
    if substantive is not None:
        return Verdict(False, substantive, asserted if substantive.startswith("expression_mismatch") else None)
    form = _form_reason(caption, text, words, rules)
    if form is not None:
        return Verdict(False, form, None)
    return Verdict(True, None, asserted)


def _substantive_reason(parsed: ParsedExpression, text: str, asserted: str | None, expected: str | None,
                        rules: ValidationRules) -> str | None:
    """What is wrong with what the caption says, before how it says it (module docstring order)."""
    if expected is not None and asserted is not None and asserted != expected:
        return f"expression_mismatch:{asserted}!={expected}"
    if not _mentions_face(parsed, text):
        return "no_face_content"
    if expected is not None and asserted is None:
        if _is_tie(parsed.scores, rules.min_expression_score):
            return "ambiguous_expression"
        if rules.require_expression:
            return "no_expression"
    return None


def validate_captions(
    captions: Sequence[str], image_expressions: Sequence[str | None], rules: ValidationRules = DEFAULT_RULES
) -> list[Verdict]:
    """`validate_caption` over aligned sequences of captions and image labels; one Verdict per caption, in order."""
    if len(captions) != len(image_expressions):
        raise ValueError(f"{len(captions)} captions but {len(image_expressions)} image expressions")
    return [validate_caption(c, e, rules) for c, e in zip(captions, image_expressions)]
