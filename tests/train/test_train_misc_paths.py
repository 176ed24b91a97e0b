"""User paths of the training side's smaller pieces: the loss-curve plot (``retnet.train.plots``) and the chat
rendering of conversational pairs (``retnet.tokenization.render_pair``)."""

import json

import pytest

from retnet.tokenization import DEFAULT_CHAT_TEMPLATE, render_pair
from retnet.train.plots import plot_losses

BLUE = (0x1F / 255, 0x77 / 255, 0xB4 / 255)  # matplotlib's tab:blue, the train curve's colour


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _drawn_at(monkeypatch, png, step, loss, colour=BLUE) -> bool:
    """Whether the saved ``png`` shows ``colour`` where the data point (step, loss) lies."""
    import matplotlib.image
    import matplotlib.pyplot as plt
    import numpy as np

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    plot_losses(png.with_suffix(".jsonl"), png)
    x, y = figures[-1].axes[0].transData.transform((step, loss))
    image = matplotlib.image.imread(png)[..., :3]
    row, col = image.shape[0] - round(float(y)), round(float(x))
    patch = image[row - 2: row + 3, col - 2: col + 3]
    return bool((np.abs(patch - np.array(colour)).max(axis=-1) < 0.1).any())


def test_a_run_of_one_logged_step_plots_its_train_loss(tmp_path, monkeypatch):
    """A run with a single train record (train.steps 1, or a log interval as long as the run) used to save a
    loss.png with nothing on it: a one-point line has no length, and the train curve had no marker."""
    _write(tmp_path / "loss.jsonl", [{"kind": "train", "step": 1, "loss": 5.0},
                                     {"kind": "val", "step": 1, "val_loss": 5.2}])
    assert _drawn_at(monkeypatch, tmp_path / "loss.png", 1, 5.0)


def test_the_plot_leaves_out_records_without_a_finite_loss(tmp_path):
    """A record whose loss is null, missing or not a number (a hand-edited or foreign metrics.jsonl) or a line
    that is JSON but no record crashed plot_losses, which the trainer calls after the export: the run failed at
    its very end. They are left out as NaN losses and unreadable lines are."""
    metrics = _write(tmp_path / "metrics.jsonl", [
        {"kind": "train", "step": 1, "loss": None}, {"kind": "train", "step": 2}, "3", '"text"', "[1, 2]",
        {"kind": "train", "step": 3, "loss": "4.0"}, {"kind": "val", "step": 3, "val_loss": None},
        {"kind": "train", "step": 4, "loss": float("nan")}, {"kind": "train", "loss": 3.0},
        {"kind": "train", "step": 5, "loss": True},
    ])
    assert plot_losses(metrics, tmp_path / "none.png") is None  # nothing plottable is left
    with metrics.open("a") as stream:
        stream.write(json.dumps({"kind": "train", "step": 6, "loss": 4.5}) + "\n")
    assert plot_losses(metrics, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert (tmp_path / "loss.png").stat().st_size > 0


def _render(messages, **options):
    from jinja2 import Template

    return Template(DEFAULT_CHAT_TEMPLATE).render(messages=messages, **{"add_generation_prompt": False, **options})


@pytest.mark.parametrize("prompt, completions, message", [
    ([], [[{"role": "assistant", "content": "yes"}]], "the prompt has no messages"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I"}], [[]],
     "completion 0 has no messages"),
    ([{"role": "user", "content": "hi"}], [[{"role": "assistant", "content": "a"}], []],
     "completion 1 has no messages"),
])
def test_render_pair_refuses_an_empty_prompt_or_completion_by_name(prompt, completions, message):
    """An empty message list in a conversational pair (a preference row's prompt or chosen, a /score request's
    messages) raised a bare IndexError ("list index out of range"), or, for a completion without a prefill,
    the template-mismatch error, which says nothing of what is wrong with the row."""
    with pytest.raises(ValueError, match=message):
        render_pair(prompt, completions, _render)


def test_token_bytes_of_added_tokens_are_their_text():
    """An added token (``tokenizer.add_tokens``) is kept as its text, not in GPT-2's byte alphabet, yet TokenBytes
    read its characters through that alphabet: "naïve" gave b"na\\xefve" (ï is the alphabet's stand-in for byte
    0xEF), so the logprobs' bytes of a text did not add up to its UTF-8, and the token's label was a "bytes:" one."""
    from retnet.tokenization import TokenBytes, train_byte_level_bpe

    tokenizer = train_byte_level_bpe(["hello world, this is a test. " * 20] * 4, vocab_size=300)
    tokenizer.add_tokens(["naïve", "°C", " spaced"])
    text = "a naïve 20°C x spaced"
    ids = tokenizer.encode(text)
    token_bytes = TokenBytes(tokenizer)
    assert b"".join(token_bytes(i) for i in ids) == text.encode("utf-8")
    naive = tokenizer.convert_tokens_to_ids("naïve")
    assert token_bytes.label(naive) == token_bytes.label(naive, start=True) == "naïve"
    assert token_bytes(tokenizer.convert_tokens_to_ids("hello")) == b"hello"  # a learned token, through the alphabet
