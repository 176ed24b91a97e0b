"""Model-side fields a hand-edited config.json or a from_pretrained override can get wrong, refused at load."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

import retnet  # noqa: F401
from retnet.model import RetNetConfig
from retnet.model.modeling_retnet import RetNetForSequenceClassification

TINY = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    RetNetForSequenceClassification(RetNetConfig(**TINY, num_labels=3)).save_pretrained(path)
    return path


@pytest.mark.parametrize("problem_type", ["regresion", "multi_label", ""])
def test_a_misspelt_problem_type_in_config_json_is_refused_at_load(classifier_dir, tmp_path, problem_type):
    # It was loaded: training failed at the first labelled batch (RuntimeError "Invalid problem type") and the
    # server's classification scores fell silently to a softmax.
    config = json.loads((classifier_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "problem_type": problem_type}))
    with pytest.raises(ValueError, match=rf"RetNetConfig\.problem_type .*got '{problem_type}'"):
        AutoConfig.from_pretrained(tmp_path)


def test_a_problem_type_override_is_checked_as_config_json_is(classifier_dir):
    with pytest.raises(ValueError, match=r"RetNetConfig\.problem_type .*got 'multi_label'"):
        AutoModelForSequenceClassification.from_pretrained(classifier_dir, problem_type="multi_label")


@pytest.mark.parametrize("problem_type", ["regression", "single_label_classification", "multi_label_classification"])
def test_the_problem_types_load(classifier_dir, problem_type):
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir, problem_type=problem_type)
    assert model.config.problem_type == problem_type


@pytest.mark.parametrize("num_labels", ["2", 2.0, True, 0, -1])
def test_a_bad_num_labels_is_refused_naming_it(classifier_dir, num_labels):
    # "2" raised transformers' TypeError from range(); -1 made a classifier of 0 labels, which then failed to load
    # its own score.weight as a size mismatch.
    with pytest.raises(ValueError, match=rf"RetNetConfig\.num_labels must be a positive integer.*got {num_labels!r}"):
        AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=num_labels)
    with pytest.raises(ValueError, match=r"RetNetConfig\.num_labels"):
        RetNetConfig(**TINY, num_labels=num_labels)


def test_num_labels_still_resizes_a_classifier(classifier_dir):
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=1,
                                                               ignore_mismatched_sizes=True)
    assert model.config.num_labels == 1 and model.score.weight.shape == (1, 16)


def test_a_trained_classifier_is_re_headed_to_one_output_as_transformers_does(tmp_path):
    # transformers' loss writes problem_type single_label_classification into a classifier it trained; a reward model
    # starts from it with num_labels=1 (the type stays: transformers' own models load it so)
    import numpy as np

    model = RetNetForSequenceClassification(RetNetConfig(**TINY, num_labels=np.int64(3)))  # a NumPy count too
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([1]))
    assert model.config.problem_type == "single_label_classification" and model.config.num_labels == 3
    model.save_pretrained(tmp_path)
    one = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1, ignore_mismatched_sizes=True)
    assert one.config.num_labels == 1 and one.score.weight.shape == (1, 16)


def test_num_labels_none_is_as_if_left_out(classifier_dir):
    assert RetNetConfig(**TINY, num_labels=None).num_labels == 2  # transformers' default
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir, num_labels=None)
    assert model.config.num_labels == 3  # the saved id2label's
