"""The caption language of FEText: a template captioner for the demo, the expression lexicon, and caption validation.

- `TemplateCaptioner`: label-and-AU template captions in FEText style (an honest stand-in for the multimodal LLM).
- `parse_expression`: which expression a caption asserts, with negation handled.
- `validate_caption` / `validate_captions`: the paper's post-processing (well-formedness and expression agreement).
"""

from .lexicon import EXPRESSION_TERMS
from .template import TemplateCaptioner
from .validation import (
    DEFAULT_RULES,
    ParsedExpression,
    ValidationRules,
    Verdict,
    form_reason,
    parse_expression,
    validate_caption,
    validate_captions,
)

__all__ = [
    "DEFAULT_RULES",
    "EXPRESSION_TERMS",
    "ParsedExpression",
    "TemplateCaptioner",
    "ValidationRules",
    "Verdict",
    "form_reason",
    "parse_expression",
    "validate_caption",
    "validate_captions",
]
