"""Hand-written captions for measuring caption validation: short and long, right and wrong, each with the verdict a
careful annotator gives it (None = keep, else the reason a reviewer would give first: what is wrong with what the
caption says before how it says it). Written for this project; the long ones follow the FEText style of the
supplementary's examples. `tests/test_caption_validation.py` measures the validator against them.
"""

LONG_HAPPY = ("The woman in the image is displaying a happy facial expression. Her eyes are bright and slightly "
              "narrowed, her cheeks are raised, and her mouth is open in a wide smile that shows her upper teeth. "
              "Her eyebrows are relaxed and her gaze meets the camera.")
LONG_SAD = ("The man in the image is displaying a sad facial expression. His eyes are downcast and glossy, the inner "
            "corners of his eyebrows are drawn up, and the corners of his mouth are pulled down. His gaze is "
            "directed at the floor and the overall expression conveys sorrow.")
LONG_SURPRISE = ("The girl in the image is displaying a surprised facial expression. Her eyebrows are raised high, "
                 "her eyes are wide open and her jaw has dropped, leaving her mouth in a round open shape. Her gaze "
                 "is fixed on something in front of her.")
LONG_FEAR = ("The woman in the image is displaying a fearful facial expression. Her eyes are wide with the upper "
             "lids raised, her eyebrows are lifted and pulled together, and her lips are stretched back toward her "
             "ears. Her gaze darts to the side.")
LONG_DISGUST = ("The man in the image is displaying a disgusted facial expression. His nose is wrinkled, his upper "
                "lip is raised on one side and his eyes are narrowed. His eyebrows are lowered and his head is "
                "turned slightly away.")
LONG_ANGER = ("The man in the image is displaying an angry facial expression. His eyebrows are lowered and drawn "
              "together, his eyes are glaring, his lips are pressed tightly together and his jaw is clenched. His "
              "gaze is fixed straight at the camera.")
LONG_NEUTRAL = ("The woman in the image is displaying a neutral facial expression. Her eyes are open and focused, "
                "her nose is straight, her lips are closed and relaxed, and her eyebrows are level. Her gaze is "
                "directed straight ahead.")

CAPTIONS: list[tuple[str, str | None, str | None]] = [
    # Short captions that state the expression: kept.
    ("He looks furious, scowling with a clenched jaw.", "anger", None),
    ("She is beaming with a wide, toothy smile.", "happy", None),
    ("The man looks sad, his mouth turned down at the corners.", "sad", None),
    ("Her eyes are wide open and her jaw has dropped in surprise.", "surprise", None),
    ("He appears frightened, eyes wide and lips stretched back.", "fear", None),
    ("She wrinkles her nose in disgust, upper lip raised.", "disgust", None),
    ("His face is calm and relaxed, with a neutral expression.", "neutral", None),
    ("A smiling young woman with bright eyes.", "happy", None),
    ("The child is crying, tears running down her cheeks.", "sad", None),
    ("Wide-eyed and open-mouthed, she looks astonished.", "surprise", None),
    ("He grimaces with revulsion at something off camera.", "disgust", None),
    ("The woman looks terrified.", "fear", None),
    ("She scowls, brows drawn together in anger.", "anger", None),
    ("She gasps, eyebrows shooting up in shock.", "surprise", None),
    ("He looks worried and tense, biting his lip.", "fear", None),
    ("She laughs heartily, eyes crinkled.", "happy", None),
    ("He stares blankly, his features at rest.", "neutral", None),
    ("Her lower lip trembles as she fights back tears.", "sad", None),
    ("His lips curl in a sneer of contempt.", "contempt", None),
    # Hard: "upset" is anger or sadness, "frowns" either; an annotator reads the glare as anger.
    ("The man frowns deeply, clearly upset and glaring.", "anger", None),
    # Long FEText-style captions that match their label: kept.
    (LONG_HAPPY, "happy", None),
    (LONG_SAD, "sad", None),
    (LONG_SURPRISE, "surprise", None),
    (LONG_FEAR, "fear", None),
    (LONG_DISGUST, "disgust", None),
    (LONG_ANGER, "anger", None),
    (LONG_NEUTRAL, "neutral", None),
    (LONG_NEUTRAL.replace("closed and relaxed", "closed in a faint smile"), "neutral", None),
    # The wrong expression, short or long: rejected as a mismatch, whatever their length or form.
    ("He looks happy, smiling broadly.", "sad", "expression_mismatch:happy!=sad"),
    ("She looks disgusted.", "fear", "expression_mismatch:disgust!=fear"),
    ("The man is weeping", "happy", "expression_mismatch:sad!=happy"),  # cut off too: the mismatch comes first
    (LONG_ANGER, "neutral", "expression_mismatch:anger!=neutral"),
    (LONG_HAPPY, "surprise", "expression_mismatch:happy!=surprise"),
    (LONG_FEAR[:-24], "disgust", "expression_mismatch:fear!=disgust"),  # truncated and wrong
    # Nothing about a face: rejected as such, short or long.
    ("A red car parked outside a shop.", "happy", "no_face_content"),
    ("Sunset.", "happy", "no_face_content"),
    ("The image shows a wooden table with a bowl of apples, a folded newspaper and a cup of coffee next to a "
     "window with white curtains, in soft morning light.", "neutral", "no_face_content"),
    # A face but no expression while the label is known.
    ("The woman in the photo has brown eyes, a straight nose and short dark hair.", "happy", "no_expression"),
    # Fragments: too short even when the expression is right.
    ("Happy face.", "happy", "too_short"),
    ("A sad man.", "sad", "too_short"),
    # Form failures of a caption that says the right thing.
    (LONG_HAPPY[:-30], "happy", "truncated"),
    (LONG_SAD.rsplit(" ", 3)[0] + " and.", "sad", "truncated"),
    (LONG_NEUTRAL + " " + LONG_NEUTRAL, "neutral", "repetition"),
    ("She looks very very very very happy today.", "happy", "repetition"),
    ("%%% 0x1F ### 1010 @@@ $$$ ^^^ 42 *** !!! 999 +++ === ~~~", "happy", "garbage"),
    ("", "happy", "empty"),
    # Two expressions claimed equally.
    ("The man is displaying a happy facial expression, and the expression conveys surprise.", "happy",
     "ambiguous_expression"),
    # An unlabelled image: only form and face content are judged.
    ("The person looks surprised, mouth open.", None, None),
]
