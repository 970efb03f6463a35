"""Caption validation (SynFER Sec. 4.2.1): which captions are kept, which are rejected, and why."""

from __future__ import annotations

import random

import pytest

from synfer_pipeline.curation.captions import (
    TemplateCaptioner,
    ValidationRules,
    Verdict,
    form_reason,
    parse_expression,
    validate_caption,
    validate_captions,
)
from synfer_pipeline.vocab import EXPRESSION_AUS, EXPRESSIONS_7, UnknownLabelError

# A face description free of expression words, to bring hand-written claims to caption length.
BODY = (
    "Her eyes are open, her nose is straight, her cheeks are smooth, and her eyebrows are level "
    "while her gaze is directed at the camera."
)
HIS_BODY = BODY.replace("Her ", "His ").replace("her ", "his ")

# The four FEText examples of the supplementary (Fig. 4), OCR line breaks kept: labels neutral, happy, neutral, sad.
SUPPLEMENTARY = [
    ("neutral", """The woman in the image is displaying a neutral facial
expression. Her eyes are open and focused, and her nose is
straight. Her cheeks are slightly puffed out, and her lips are
slightly parted, giving her a slight smile. Her eyebrows are
relaxed, and her gaze is directed straight ahead. The neutral
expression suggests that she is neither happy nor sad, but rather
in a state of calm or neutrality."""),
    ("happy", """The man in the image is displaying a Happy facial expression.
His eyes are open and looking directly at the camera, indicating
that he is engaged and attentive. His nose is straight, and his
cheeks are slightly puffed out, adding to the overall cheerfulness
of his expression. His mouth is slightly open, and his teeth are
visible, which is a common feature of a happy smile. The mans
gaze is directed straight at the camera, suggesting that he is
comfortable and at ease."""),
    ("neutral", """The woman in the image is displaying a neutral facial
expression. Her eyes are open, and her gaze is directed to the
left. Her nose is straight, and her lips are slightly parted as if she
is about to speak. The cheeks of her face are slightly puffed out,
and her eyebrows are arched, giving her a thoughtful
appearance. The background of the image is blurred, but it
appears to be a yellowish-green color, which contrasts with the
womans skin tone."""),
    ("sad", """The man in the image is displaying a sad facial expression. His
eyes are closed, and his nose is prominent. His cheeks are
slightly puffed out, and his eyebrows are furrowed. The mouth
is slightly open, and the lips are slightly parted. The gaze is
directed downwards, and the overall expression conveys a sense
of sadness or melancholy."""),
]

# (caption, image expression, expected reason (None = accepted), expected asserted expression)
TABLE = [
    # One or two synonyms per class, accepted under their own label.
    (f"The woman in the photo looks joyful and cheerful. {BODY}", "happy", None, "happy"),
    (f"The man is grinning at the camera. {HIS_BODY}", "happy", None, "happy"),
    (f"The woman appears sorrowful, almost tearful. {BODY}", "sad", None, "sad"),
    (f"{HIS_BODY} The overall expression conveys melancholy; he seems downcast.", "sad", None, "sad"),
    (f"The woman looks astonished, as if something just happened. {BODY}", "surprise", None, "surprise"),
    (f"The man seems startled and amazed. {HIS_BODY}", "surprise", None, "surprise"),
    (f"The woman appears terrified and frightened. {BODY}", "fear", None, "fear"),
    (f"The person has an anxious facial expression. {BODY}", "fear", None, "fear"),
    (f"The man looks repulsed, clearly grossed out by something. {HIS_BODY}", "disgust", None, "disgust"),
    (f"The woman looks furious. {BODY} Overall, the expression conveys rage.", "anger", None, "anger"),
    (f"The man is irritated and annoyed. {HIS_BODY}", "angry", None, "anger"),
    (f"The woman's face is expressionless and impassive. {BODY}", "neutral", None, "neutral"),
    (f"The man has a composed facial expression. {HIS_BODY}", "neutral", None, "neutral"),
    (f"The woman wears a contemptuous smirk. {BODY}", "contempt", None, "contempt"),
    (f"The man is sneering with disdain. {HIS_BODY}", "contempt", None, "contempt"),
    # Negated words do not count.
    (f"The man is not smiling; his face is blank and expressionless. {HIS_BODY}", "neutral", None, "neutral"),
    (f"The woman is neither happy nor sad; she shows a neutral expression. {BODY}", "neutral", None, "neutral"),
    (f"There is no trace of anger in his face; he looks calm and composed. {HIS_BODY}", "neutral", None, "neutral"),
    (f"There is no trace of anger in his face; he looks calm and composed. {HIS_BODY}", "anger",
     "expression_mismatch:neutral!=anger", "neutral"),
    (f"The woman displays a fearful expression, without any sign of anger. {BODY}", "fear", None, "fear"),
    (f"The man looks surprised rather than angry. {HIS_BODY}", "surprise", None, "surprise"),
    (f"The woman's face shows a lack of emotion. {BODY}", "neutral", None, "neutral"),
    (f"The woman is not smiling at all and looks sad. {BODY}", "happy", "expression_mismatch:sad!=happy", "sad"),
    # Traps: a faint smile on a neutral face, a calm gaze on an angry one.
    (f"The woman has a neutral expression with a slight smile. {BODY}", "neutral", None, "neutral"),
    (f"The man is displaying an angry facial expression. {HIS_BODY} His gaze is calm.", "anger", None, "anger"),
    # Wrong expression.
    (f"The man in the image is displaying a happy facial expression. {HIS_BODY}", "sad",
     "expression_mismatch:happy!=sad", "happy"),
    (f"The woman looks disgusted. {BODY}", "fear", "expression_mismatch:disgust!=fear", "disgust"),
    # Two classes asserted equally.
    (f"The man is displaying a happy facial expression. {HIS_BODY} Overall, the expression conveys surprise.",
     "happy", "ambiguous_expression", None),
    # A face described without any expression: rejected when the label is known, kept when it is not.
    (f"The woman in the image faces the camera. {BODY}", "happy", "no_expression", None),
    (f"The woman in the image faces the camera. {BODY}", None, None, None),
    # An unknown image label checks form only, whatever is asserted.
    (f"The man looks furious. {HIS_BODY}", None, None, "anger"),
    # Form failures.
    ("", "happy", "empty", None),
    ("   \n ", "happy", "empty", None),
    ("A happy woman.", "happy", "too_short", None),
    (f"The woman looks joyful and cheerful. {BODY} Her lips are", "happy", "truncated", None),
    (f"The woman looks joyful and cheerful. {BODY} Her lips are slightly parted and the.", "happy", "truncated", None),
    (f"The woman looks joyful and cheerful. {BODY} Her lips are slightly parted...", "happy", "truncated", None),
    (f"The woman looks joyful. {BODY} {BODY}", "happy", "repetition", None),
    (f"The woman looks very very very very happy. {BODY}", "happy", "repetition", None),
    ("The woman looks happy. " + "and her eyes are open and her eyes are open " * 4 + "end.", "happy",
     "repetition", None),
    ("#### 0x1F 0101 $$$ %%% ^^^ 12.5 *** ### @@@ !!! 999 888 777 ||| ~~~ +++ === <<< >>> ::: ;;; 42.", "happy",
     "garbage", None),
    ("Happy " + "a" * 60 + " eyes.", "happy", "garbage", None),
    ("The image shows a sunny beach with tall palm trees, white sand and a calm blue sea under a clear sky, "
     "with a small boat drifting near the horizon in the late afternoon light.", "happy", "no_face_content", None),
]


@pytest.mark.parametrize("caption, expected_label, reason, asserted", TABLE)
def test_hand_written_caption_table_gives_expected_verdict(caption, expected_label, reason, asserted):
    verdict = validate_caption(caption, expected_label)
    assert verdict == Verdict(ok=reason is None, reason=reason, asserted=asserted)


@pytest.mark.parametrize("label, caption", SUPPLEMENTARY)
def test_supplementary_fetext_examples_are_accepted_with_their_labels(label, caption):
    assert validate_caption(caption, label) == Verdict(ok=True, reason=None, asserted=label)


def test_neither_happy_nor_sad_negates_both_and_slight_smile_does_not_outvote_neutral():
    parsed = parse_expression(SUPPLEMENTARY[0][1])
    assert parsed.expression == "neutral"
    assert parsed.negated == ("happy", "sad")
    assert parsed.scores["sad"] == 0.0
    assert 0.0 < parsed.scores["happy"] < 1.0  # only the faint "slight smile"
    assert parsed.scores["neutral"] > 3.0


@pytest.mark.parametrize("phrase, negated_word", [
    ("She is not smiling.", "smiling"),
    ("There is no sign of anger.", "anger"),
    ("He shows no trace of fear or disgust.", "disgust"),
    ("She looks on without fear.", "fear"),
    ("He looks calm rather than angry.", "angry"),
    ("She shows a complete lack of joy.", "joy"),
    ("He doesn't look happy.", "happy"),
    ("She cannot be called cheerful.", "cheerful"),
    ("She frowns instead of smiling.", "smiling"),
])
def test_negation_cues_keep_words_from_counting(phrase, negated_word):
    parsed = parse_expression(phrase)
    assert negated_word in parsed.negated
    assert negated_word not in parsed.evidence


def test_negation_scope_ends_at_clause_boundary():
    parsed = parse_expression("She is not tired, but she looks happy.")
    assert parsed.expression == "happy"
    assert parsed.negated == ()
    parsed = parse_expression("He is not tense and his face looks angry.")
    assert parsed.expression == "anger"


def test_explicit_assertion_outweighs_incidental_words():
    caption = "The man is displaying a sad facial expression, though a smile and some amusement linger."
    parsed = parse_expression(caption)
    assert parsed.expression == "sad"
    assert parsed.scores["sad"] == 3.0
    assert parsed.scores["happy"] < parsed.scores["sad"]


def test_passing_hedged_mention_counts_half():
    parsed = parse_expression("The man is displaying a sad facial expression. There may be a hint of anger.")
    assert parsed.scores["anger"] == 0.5
    assert parsed.expression == "sad"
    # Inside the claim a hint is still the claim: "the expression conveys a hint of sadness".
    assert parse_expression("The overall expression conveys a hint of sadness.").scores["sad"] == 3.0


def test_calm_gaze_is_not_an_assertion_of_neutral():
    gaze = parse_expression("Her gaze is calm and steady.")
    assert gaze.scores["neutral"] == 0.5
    assert gaze.expression is None
    face = parse_expression("She looks calm and steady.")
    assert face.scores["neutral"] == 1.5
    assert face.expression == "neutral"


def test_missing_caption_is_rejected_as_empty():
    assert validate_caption(None, "happy") == Verdict(ok=False, reason="empty", asserted=None)
    assert validate_caption(float("nan"), None).reason == "empty"


def test_missing_image_label_means_unknown():
    caption = f"The man looks furious. {HIS_BODY}"
    assert validate_caption(caption, float("nan")) == Verdict(ok=True, reason=None, asserted="anger")


def test_inconsistent_rules_are_refused():
    with pytest.raises(ValueError):
        ValidationRules(min_words=50, max_words=10)


def test_caption_without_expression_words_asserts_nothing():
    parsed = parse_expression(BODY)
    assert parsed.expression is None
    assert parsed.evidence == ()
    assert all(score == 0.0 for score in parsed.scores.values())


def test_no_expression_is_accepted_when_the_rule_is_relaxed():
    caption = f"The woman in the image faces the camera. {BODY}"
    relaxed = ValidationRules(require_expression=False)
    assert validate_caption(caption, "happy", relaxed) == Verdict(ok=True, reason=None, asserted=None)


def test_word_bounds_are_configurable():
    caption = f"The woman looks joyful. {BODY}"
    n_words = len(caption.split())
    assert validate_caption(caption, "happy", ValidationRules(max_words=n_words - 1)).reason == "too_long"
    assert validate_caption(caption, "happy", ValidationRules(min_words=n_words + 1)).reason == "too_short"
    assert validate_caption(caption, "happy", ValidationRules(min_words=n_words, max_words=n_words)).ok


def test_long_rambling_caption_is_too_long():
    sentences = [f"Detail number {i} of her face is noted." for i in range(80)]
    caption = f"The woman looks joyful. {' '.join(sentences)}"
    assert form_reason(caption) == "too_long"


def test_image_label_spellings_are_canonicalised_and_unknown_labels_raise():
    caption = f"The woman looks joyful. {BODY}"
    assert validate_caption(caption, "Happiness").ok
    with pytest.raises(UnknownLabelError):
        validate_caption(caption, "bored")


def test_batch_validation_matches_single_captions_in_order():
    captions = [c for c, *_ in TABLE]
    labels = [label for _, label, *_ in TABLE]
    assert validate_captions(captions, labels) == [validate_caption(c, e) for c, e in zip(captions, labels)]
    with pytest.raises(ValueError):
        validate_captions(captions, labels[:-1])


# --- The paper's scenario: 62% aligned captions before validation -------------------------------------------

# Paraphrase vocabulary written for the test, independent of the template captioner's phrasing.
ADJECTIVES = {
    "neutral": ["neutral", "expressionless", "impassive", "composed"],
    "happy": ["happy", "joyful", "cheerful", "delighted"],
    "sad": ["sad", "sorrowful", "downcast", "gloomy"],
    "surprise": ["surprised", "astonished", "amazed", "startled"],
    "fear": ["fearful", "frightened", "terrified", "scared"],
    "disgust": ["disgusted", "repulsed", "revolted", "disgusted"],
    "anger": ["angry", "furious", "irritated", "hostile"],
}
NOUNS = {
    "neutral": "neutrality", "happy": "happiness", "sad": "sadness", "surprise": "astonishment", "fear": "fear",
    "disgust": "disgust", "anger": "anger",
}
CLAIMS = [
    "The {s} in the image looks {adj}.",
    "The {s} in the picture is displaying {art} {adj} facial expression.",
    "The {s} appears to be quite {adj}.",
    "In this photo the {s} has {art} {adj} expression.",
]
# Captions that never name the class in a claim, only through what the face does.
IMPLICIT = {
    "neutral": "Her face is calm and composed, with no particular emotion.",
    "happy": "She is smiling broadly, and her eyes crinkle with amusement.",
    "sad": "Tears well up in her eyes and she seems close to crying.",
    "surprise": "Her mouth falls open in shock.",
    "fear": "She shrinks back as if scared of something.",
    "disgust": "She wrinkles her nose in distaste.",
    "anger": "She glares, her jaw clenched in fury.",
}
CLOSINGS = [
    "Overall, the expression conveys a sense of {noun}.",
    "The overall expression suggests {noun}.",
    "Her gaze is calm.",
    "",
]


def _paraphrase(asserted: str, rng: random.Random) -> str:
    """A free-form caption asserting `asserted`, explicitly or only implicitly, with distractors: a negated other
    class, a passing mention of another class, a faint smile, a calm gaze."""
    adj = rng.choice(ADJECTIVES[asserted])
    claim = rng.choice(CLAIMS).format(s=rng.choice(["woman", "man", "person"]), adj=adj,
                                      art="an" if adj[0] in "aeiou" else "a")
    if rng.random() < 0.2:
        claim = "The woman in the image faces the camera. " + IMPLICIT[asserted]
    others = [e for e in ADJECTIVES if e != asserted and e != "neutral"]
    distractor = rng.choice([
        f"There is no sign of {NOUNS[rng.choice(others)]} in the face.",
        "She is neither {} nor {}.".format(*(rng.choice(ADJECTIVES[rng.choice(others)]) for _ in range(2))),
        f"There may be a hint of {NOUNS[rng.choice(others)]} around the mouth.",
        "Her lips are parted in a slight smile." if asserted == "neutral" else "",
        "",
    ])
    closing = rng.choice(CLOSINGS).format(noun=NOUNS[asserted])
    return " ".join(part for part in (claim, BODY, distractor, closing) if part)


def _scenario(n: int = 1000, wrong_fraction: float = 0.38, seed: int = 0):
    """n captions for images with known labels; a `wrong_fraction` of them assert another expression, and ~3% of
    all are cut off mid-sentence (correct or not)."""
    rng = random.Random(seed)
    captioner = TemplateCaptioner(seed)
    wrong = set(rng.sample(range(n), round(n * wrong_fraction)))
    captions, labels, correct = [], [], []
    for i in range(n):
        true_label = EXPRESSIONS_7[i % len(EXPRESSIONS_7)]
        asserted = rng.choice([e for e in EXPRESSIONS_7 if e != true_label]) if i in wrong else true_label
        if rng.random() < 0.5:
            aus = rng.sample(EXPRESSION_AUS[asserted], rng.randint(0, len(EXPRESSION_AUS[asserted])))
            caption = captioner.caption(asserted, aus, rng.choice(["woman", "man", "person"]), key=f"img-{i}")
        else:
            caption = _paraphrase(asserted, rng)
        if rng.random() < 0.03:  # the LLM ran out of tokens mid-sentence
            caption = caption[: int(len(caption) * 0.7)].rstrip(" .")
        captions.append(caption)
        labels.append(true_label)
        correct.append(i not in wrong)
    return captions, labels, correct


def test_validation_lifts_alignment_from_62_percent_above_95_and_keeps_correct_captions():
    captions, labels, correct = _scenario()
    assert sum(correct) / len(correct) == pytest.approx(0.62)

    verdicts = validate_captions(captions, labels)
    accepted = [ok for ok, v in zip(correct, verdicts) if v.ok]
    alignment_after = sum(accepted) / len(accepted)
    kept_correct = sum(accepted) / sum(correct)
    assert alignment_after > 0.95
    assert kept_correct >= 0.90
    # A wrong caption that is well formed is rejected as a mismatch naming the asserted and the expected class.
    for is_correct, verdict, label in zip(correct, verdicts, labels):
        if not is_correct and verdict.reason != "truncated":
            assert verdict.reason == f"expression_mismatch:{verdict.asserted}!={label}"


def test_on_handwritten_captions_short_and_long_the_verdicts_match_an_annotator():
    """48 hand-written captions (tests/handwritten_captions.py): 47 of 48 verdicts and reasons agree with the
    annotator's; the one miss is a genuinely ambiguous short caption ("upset and glaring")."""
    from handwritten_captions import CAPTIONS

    verdicts = [validate_caption(caption, label) for caption, label, _ in CAPTIONS]
    expected = [reason for _, _, reason in CAPTIONS]
    agree = sum(v.ok == (e is None) for v, e in zip(verdicts, expected)) / len(CAPTIONS)
    exact = sum(v.reason == e for v, e in zip(verdicts, expected)) / len(CAPTIONS)
    short_right = [(c, v) for (c, _, e), v in zip(CAPTIONS, verdicts) if e is None and len(c.split()) <= 12]
    assert len(CAPTIONS) >= 40 and len(short_right) >= 15
    assert agree >= 47 / 48 and exact >= 47 / 48, (agree, exact)
    assert sum(v.ok for _, v in short_right) >= len(short_right) - 1  # short and right is kept


@pytest.mark.parametrize(("caption", "label", "reason"), [
    ("He looks furious, scowling with a clenched jaw.", "anger", None),   # short, clear: kept
    ("The man is weeping", "happy", "expression_mismatch:sad!=happy"),   # the mismatch before the missing period
    ("Sunset.", "happy", "no_face_content"),                              # no face before too short
    ("Happy face.", "happy", "too_short"),                               # a fragment
])
def test_the_substantive_reason_comes_before_form_or_length(caption, label, reason):
    assert validate_caption(caption, label).reason == reason
