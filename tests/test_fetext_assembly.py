"""FEText assembly: captions validated against each image's reference expression, joined with AU vectors."""

import json

import numpy as np
import pandas as pd
from conftest import face_like, jpeg_bytes

from synfer_pipeline.curation.captions import ValidationRules
from synfer_pipeline.curation.captions.run import CaptionCache, TemplateRole, caption_samples, load_captioner
from synfer_pipeline.curation.fetext import alignment, fetext_samples
from synfer_pipeline.io.storage import Storage
from synfer_pipeline.vocab import OPENGRAPHAU_41

GOOD_HAPPY = ("The woman in the image is displaying a happy facial expression. Her eyes are narrowed and her cheeks are "
              "raised, her lips are curved upward into a wide smile, her eyebrows are relaxed and her gaze is directed at "
              "the camera. The overall expression conveys joy.")
SAD_CAPTION = ("The man in the image is displaying a sad facial expression. His eyes are downcast, his cheeks are slack, "
               "the corners of his mouth are turned down, his inner eyebrows are raised and his gaze is directed downwards. "
               "The overall expression conveys sorrow.")


def _faces(labels):
    samples, rows = [], []
    for i, label in enumerate(labels):
        key = f"k{i}"
        meta = {"sample_id": f"src-{i}", "source": "src", "label": label, "native_hr": i % 2 == 0}
        samples.append((key, {"jpg": jpeg_bytes(face_like(32, i)), "json": json.dumps(meta).encode()}))
        rows.append({"key": key, "sample_id": f"src-{i}", "source": "src", "label": label,
                     "expression": label or "happy", "expression_source": "label" if label else "classifier:x",
                     "au_probs": np.full(41, 0.1, np.float32), "aus": ["AU6", "AU12"]})
    return samples, pd.DataFrame(rows).set_index("key")


def test_matching_captions_become_fetext_samples_and_mismatches_are_rejected_with_reasons():
    samples, annotations = _faces(["happy", "happy", "sad", None])
    captions = pd.DataFrame({"key": ["k0", "k1", "k2", "k3"],
                             "caption": [GOOD_HAPPY, SAD_CAPTION, SAD_CAPTION, GOOD_HAPPY],
                             "captioner": json.dumps({"kind": "template"})}).set_index("key")
    accepted, report = fetext_samples(samples, annotations, captions, OPENGRAPHAU_41, ValidationRules())
    assert [k for k, _, _ in accepted] == ["k0", "k2", "k3"]
    assert [r["reason"] for r in report] == [None, "expression_mismatch:sad!=happy", None, None]
    key, members, row = accepted[0]
    info = members["json"]
    assert members["txt"] == GOOD_HAPPY and members["cls"] == 1
    assert info["aus"] == ["AU6", "AU12"] and len(info["au_vector"]) == 41
    assert np.flatnonzero(info["au_vector"]).tolist() == [OPENGRAPHAU_41.index("AU6"), OPENGRAPHAU_41.index("AU12")]
    assert info["native_hr"] is True and row["caption"] == GOOD_HAPPY
    assert accepted[2][1]["json"]["expression_source"] == "classifier:x"  # unlabelled: checked against the classifier


def test_alignment_is_measured_before_and_after_validation_on_labelled_sources():
    report = pd.DataFrame({"label": ["happy", "happy", "sad", "sad", None],
                           "asserted_unvalidated": ["happy", "sad", "sad", None, "happy"],
                           "asserted": ["happy", "sad", "sad", None, "happy"],
                           "ok": [True, False, True, False, True]})
    assert alignment(report) == {"labelled_captions": 4, "alignment_before": 0.5, "alignment_after": 1.0, "kept_share": 0.5}


def test_template_captions_are_cached_and_a_changed_captioner_gets_its_own_cache(tmp_path):
    store = Storage(str(tmp_path))
    samples, annotations = _faces(["happy", "sad", "anger"])
    role = load_captioner({"kind": "template"})
    cache = CaptionCache(store, store.join("mllm_captions", "src", "_cache"), role.cache_key)
    first, new = caption_samples(samples, annotations, role, cache, chunk=2)
    assert new == 3 and list(first["key"]) == ["k0", "k1", "k2"]
    again, new_again = caption_samples(samples, annotations, role, cache)
    assert new_again == 0 and again["caption"].tolist() == first["caption"].tolist()
    other = TemplateRole(seed=1)
    assert other.cache_key != role.cache_key
    _, new_other = caption_samples(samples, annotations, other, CaptionCache(store, store.join("mllm_captions", "src", "_cache"), other.cache_key))
    assert new_other == 3
    assert len(store.list(store.join("mllm_captions", "src", "_cache"), "*/part-*.parquet")) == 3  # old parts kept
    assert json.loads(first["captioner"][0])["name"] == "template-captioner"
