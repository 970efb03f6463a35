"""Facial-expression classifiers: each declares its own class order and is mapped to `vocab.EXPRESSIONS`."""

from synfer_pipeline.fer.classifiers import load_fer_classifier
from synfer_pipeline.fer.mini_xception import (
    FER2013_CLASSES,
    MiniXception,
    MiniXceptionClassifier,
    MiniXceptionFormatError,
    load_mini_xception,
    preprocess_faces,
)

__all__ = [
    "FER2013_CLASSES",
    "MiniXception",
    "MiniXceptionClassifier",
    "MiniXceptionFormatError",
    "load_fer_classifier",
    "load_mini_xception",
    "preprocess_faces",
]
