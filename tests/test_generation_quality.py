"""Generation quality on a fixed evaluation batch: the same seeds give the same images and the same figures; FER acc
and AU acc count what they say."""

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from synfer_pipeline.demo.tiny_sd import save_tiny_sd
from synfer_pipeline.evaluation.generation_quality import (EvaluationBatchSettings, au_accuracy, evaluation_conditions,
                                                           generate, score)
from synfer_pipeline.fer.role import FERClassifier
from synfer_pipeline.generation.conditions import Condition, TemplatePrompts
from synfer_pipeline.generation.sampler import SynferSampler
from synfer_pipeline.vocab import OPENGRAPHAU_41, EXPRESSION_AUS, EXPRESSIONS_7

CFG = EvaluationBatchSettings(per_class=2, steps=3, batch_size=5, seed=7)


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    return SynferSampler.from_pretrained(save_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd"))


@pytest.fixture(scope="module")
def judge():
    torch.manual_seed(0)
    net = ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                    depths=[1, 1], num_labels=7))
    return FERClassifier(net, EXPRESSIONS_7, 32, name="judge").frozen()


def test_the_batch_is_n_per_class_with_seeds_and_prompts_from_its_own_seed():
    a = evaluation_conditions(CFG, OPENGRAPHAU_41, TemplatePrompts(CFG.seed))
    b = evaluation_conditions(CFG, OPENGRAPHAU_41, TemplatePrompts(CFG.seed))
    assert a == b and [c.label for c in a] == [e for e in EXPRESSIONS_7 for _ in range(2)]
    assert len({c.seed for c in a}) == len(a)
    for c in a:
        assert set(c.aus) <= set(EXPRESSION_AUS[c.label]) and (bool(c.aus) or c.label == "neutral")
    other = evaluation_conditions(EvaluationBatchSettings(per_class=2, seed=8), OPENGRAPHAU_41, TemplatePrompts(8))
    assert [c.seed for c in other] != [c.seed for c in a]


def test_the_same_seeds_give_the_same_images_and_figures(sampler, judge):
    conditions = evaluation_conditions(CFG, OPENGRAPHAU_41, TemplatePrompts(CFG.seed))
    first, second = generate(sampler, conditions, CFG), generate(sampler, conditions, CFG)
    assert first.shape == (14, 3, 64, 64) and torch.equal(first, second)
    a, b = score(first, conditions, judge), score(second, conditions, judge)
    assert a.fer_acc == b.fer_acc and a.predicted == b.predicted
    assert a.fer_acc == sum(p == c.label for p, c in zip(a.predicted, conditions)) / 14
    assert list(a.grids) == list(EXPRESSIONS_7) and a.au_acc is None  # no detector given: no AU figure
    # Batching is not part of the figure: another batch size draws the same images.
    third = generate(sampler, conditions, EvaluationBatchSettings(per_class=2, steps=3, batch_size=14, seed=7))
    assert torch.allclose(first, third, atol=1e-5)


def _condition(label, aus):
    return Condition(label, tuple(aus), (), "", 0)


def test_au_accuracy_counts_each_au_of_the_labels_set():
    # happy's set is AU6, AU12: intended {AU12}; detected {AU6, AU12} -> AU12 agrees, AU6 does not: 1 of 2.
    # surprise's set AU1, AU2, AU5, AU26: intended all; detected AU1 AU2 -> 2 of 4. Neutral counts nothing.
    conditions = [_condition("happy", ["AU12"]), _condition("surprise", ["AU1", "AU2", "AU5", "AU26"]),
                  _condition("neutral", [])]
    detected = [["AU6", "AU12"], ["AU1", "AU2", "AU9"], ["AU12"]]
    assert EXPRESSION_AUS["happy"] == ("AU6", "AU12") and len(EXPRESSION_AUS["surprise"]) == 4
    assert au_accuracy(conditions, detected) == pytest.approx(3 / 6)
    assert au_accuracy([_condition("neutral", [])], [["AU1"]]) is None
