"""FER classifiers as roles (guide, judge, voters): each declares its input and class order, mapped to
`vocab.EXPRESSIONS`, with a differentiable forward from images in [-1, 1]. `load_fer_classifier` loads every kind."""

from synfer_pipeline.fer.classifiers import FERSpec, load_fer_classifier
from synfer_pipeline.fer.mini_xception import FER2013_CLASSES, MiniXception, MiniXceptionFormatError, load_mini_xception
from synfer_pipeline.fer.role import FERClassifier, RoleError

__all__ = ["FER2013_CLASSES", "FERClassifier", "FERSpec", "MiniXception", "MiniXceptionFormatError", "RoleError",
           "load_fer_classifier", "load_mini_xception"]
