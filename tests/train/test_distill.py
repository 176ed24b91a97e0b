"""Knowledge distillation (``[distill]``): the chunked KD loss against a plain full-logits computation, a micro
student pulled towards a micro teacher, ``alpha`` 0 as plain training, exact resume, and the refusals."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from retnet.model import RetNetConfig, RetNetForCausalLM
from retnet.model.distillation import Distillation, linear_distillation_loss
from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.config import ConfigError, load_config


# ----------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------
def reference_loss(hidden, weight, teacher_hidden, teacher_weight, labels, temperature, alpha, kind,
                   num_items=None):
    """The distillation loss from both models' full logits, with autograd."""
    vocab = weight.shape[0]
    student = (hidden @ weight.T).float()[:, :-1].reshape(-1, vocab)
    teacher = (teacher_hidden @ teacher_weight.T).float()[:, :-1].reshape(-1, vocab)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    student, teacher, targets = student[keep], teacher[keep], targets[keep]
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    if kind == "kl":
        divergence = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    else:
        divergence = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    kd = temperature**2 * divergence
    ce = F.cross_entropy(student, targets, reduction="none")
    denominator = keep.sum() if num_items is None else num_items
    return (alpha * kd + (1 - alpha) * ce).sum() / denominator, kd.sum() / denominator, ce.sum() / denominator


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
@pytest.mark.parametrize(("temperature", "alpha", "chunk", "num_items"),
                         [(1.0, 1.0, None, None), (2.0, 0.5, 3, None), (0.7, 0.0, 5, None), (1.5, 0.25, 1, 40),
                          (3.0, 1.0, 7, None)])
def test_the_chunked_loss_equals_the_full_logits_one(kind, temperature, alpha, chunk, num_items):
    """Value, parts and gradients (the student's hidden states and head) equal autograd's through the full logits,
    for odd chunk sizes (a last chunk cut short), −100 labels, a temperature other than 1 and alpha's mixes; the
    teacher gets no gradient."""
    torch.manual_seed(0)
    batch, length, dim, teacher_dim, vocab = 3, 11, 8, 12, 37
    hidden = torch.randn(batch, length, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, teacher_dim)
    teacher_weight = torch.randn(vocab, teacher_dim)
    labels = torch.randint(0, vocab, (batch, length))
    labels[0, 3:6] = -100
    labels[2, :7] = -100
    loss, parts = linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels, num_items,
                                           temperature=temperature, alpha=alpha, kind=kind, chunk_tokens=chunk)
    grads = torch.autograd.grad(loss * 1.7, (hidden, weight))
    expected, kd, ce = reference_loss(hidden, weight, teacher_hidden, teacher_weight, labels, temperature, alpha,
                                      kind, num_items)
    wanted = torch.autograd.grad(expected * 1.7, (hidden, weight))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert parts.tolist() == pytest.approx([kd.item(), ce.item()], rel=1e-5, abs=1e-6)
    assert not parts.requires_grad
    for got, want in zip(grads, wanted, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert grads[0][0, 2:5].abs().sum() == 0 and grads[0][:, -1].abs().sum() == 0  # no target: no gradient


def test_at_alpha_0_it_is_the_fused_cross_entropy_and_with_no_target_nan():
    from retnet.model.loss import linear_cross_entropy

    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 9, 8, requires_grad=True), torch.randn(29, 8, requires_grad=True)
    labels = torch.randint(0, 29, (2, 9))
    labels[1, 4] = -100
    loss, _ = linear_distillation_loss(hidden, weight, torch.randn(2, 9, 5), torch.randn(29, 5), labels, alpha=0.0)
    plain = linear_cross_entropy(hidden, weight, labels)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(plain, (hidden, weight)),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    none = torch.full_like(labels, -100)
    empty, _ = linear_distillation_loss(hidden, weight, torch.randn(2, 9, 5), torch.randn(29, 5), none)
    assert empty.isnan()  # as the cross-entropy's mean over nothing
    assert all(g.abs().sum() == 0 for g in torch.autograd.grad(empty, (hidden, weight)))


def test_the_model_forward_distills_only_in_training():
    """``distill=`` replaces the loss by the KD loss of the model's own hidden states and head (its parts left on
    the object), whatever ``fuse_linear_cross_entropy`` says; in eval mode it is refused (validation is plain)."""
    torch.manual_seed(2)
    config = RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=64, fuse_linear_cross_entropy=False)
    model = RetNetForCausalLM(config)
    ids = torch.randint(0, 64, (2, 12))
    teacher_hidden, teacher_weight = torch.randn(2, 12, 16), torch.randn(64, 16)
    distill = Distillation(teacher_hidden, teacher_weight, temperature=2.0, alpha=0.5)
    loss = model(input_ids=ids, labels=ids, distill=distill).loss
    hidden = model.model(input_ids=ids).last_hidden_state
    expected, kd, ce = reference_loss(hidden, model.lm_head.weight, teacher_hidden, teacher_weight, ids, 2.0, 0.5,
                                      "kl")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert distill.parts.tolist() == pytest.approx([kd.item(), ce.item()], rel=1e-5)
    model.eval()
    with pytest.raises(ValueError, match="distill needs labels"):
        model(input_ids=ids, labels=ids, distill=distill)


class PeakStorage:
    """Under it (a ``TorchDispatchMode``), the most bytes of the storages its ops created that were alive at once:
    what a loss holds at its peak, its inputs aside."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live: dict[int, int] = {}
        self.peak, self.ops = 0, []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import weakref

                from torch.utils._pytree import tree_flatten

                out = func(*args, **(kwargs or {}))
                tracker.ops.append(str(func))
                for tensor in tree_flatten(out)[0]:
                    storage = tensor.untyped_storage() if isinstance(tensor, torch.Tensor) else None
                    if storage is not None and storage.data_ptr() and storage.data_ptr() not in tracker.live:
                        tracker.live[storage.data_ptr()] = storage.nbytes()
                        weakref.finalize(storage, tracker.live.pop, storage.data_ptr(), None)
                        tracker.peak = max(tracker.peak, sum(tracker.live.values()))
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_the_chunked_loss_holds_few_chunk_buffers(kind, alpha):
    """Its peak, what the KD loss costs beyond the fused cross-entropy: at most four fp32 [chunk, vocab] buffers
    alive at once (three at alpha 1, without the hard targets' gradient), none carried into the next chunk (it held
    eight: two carried, p ⊙ (log p − log q) out of place). One host sync (the targets' count), whatever the
    chunks."""
    torch.manual_seed(3)
    tokens, dim, vocab, chunk = 512, 4, 4096, 128
    hidden, weight = torch.randn(1, tokens, dim, requires_grad=True), torch.randn(vocab, dim, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(1, tokens, dim), torch.randn(vocab, dim)
    labels = torch.randint(0, vocab, (1, tokens))
    with PeakStorage() as tracked:
        linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels, temperature=2.0,
                                 alpha=alpha, kind=kind, chunk_tokens=chunk)
    buffers = tracked.peak / (chunk * vocab * 4)  # the rest (the gradients, the indices) is a tenth of one
    assert buffers < (4.5 if alpha < 1 else 3.5), buffers
    assert tracked.ops.count("aten.nonzero.default") == 1 and "aten._local_scalar_dense.default" not in tracked.ops


def test_the_backward_is_the_fused_cross_entropy_s():
    """One backward for both fused losses (their gradients come from the forward, scaled by the upstream one):
    the distillation loss's gradients scale as autograd's, and raise when differentiated again."""
    from retnet.model import distillation, loss

    assert distillation.scaled_saved_gradients is loss.scaled_saved_gradients
    torch.manual_seed(4)
    hidden, weight = torch.randn(2, 7, 8, requires_grad=True), torch.randn(19, 8, requires_grad=True)
    labels = torch.randint(0, 19, (2, 7))
    value, _ = linear_distillation_loss(hidden, weight, torch.randn(2, 7, 5), torch.randn(19, 5), labels, alpha=0.5)
    once = torch.autograd.grad(value, hidden, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(value * -2.5, hidden, retain_graph=True)[0], once * -2.5)
    grad, = torch.autograd.grad(value, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match=r"linear_distillation_loss .* has no double backward"):
        grad.sum().backward()


def test_the_config_checks_the_loss_s_kinds():
    """``distill.kind`` is checked against the loss's own tuple, not a copy of it."""
    from retnet.model import distillation
    from retnet.train import config_tuning

    assert config_tuning.DISTILL_KINDS is distillation.DISTILL_KINDS


# ----------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------
def train_teacher(root: Path, corpus, tokenizer_dir) -> Path:
    """A micro teacher (hidden 64, twice the students') trained 60 steps in this process under ``root`` and
    exported with its tokenizer: the export."""
    from .conftest import micro_args

    assert main(micro_args(corpus, tokenizer_dir, root / "cache", root / "run", checkpoint__export=True,
                           train__steps=60, optim__lr=1e-2, model__hidden_size=64)) == 0
    return root / "run" / "export"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus, tokenizer_dir) -> Path:
    """``train_teacher``'s export."""
    return train_teacher(tmp_path_factory.mktemp("teacher"), corpus, tokenizer_dir)


def distill_args(args: list[str], teacher, **overrides) -> list[str]:
    """``micro`` arguments without the tokenizer (the teacher's), distilling from ``teacher``."""
    kept = [a for a in args if not a.startswith("--data.tokenizer=")]
    return [*kept, f"--distill.teacher={teacher}", *[f"--{k.replace('__', '.')}={v}" for k, v in overrides.items()]]


def held_out_blocks(tokenizer, count: int = 24, length: int = 32) -> torch.Tensor:
    """Blocks of stdlib sources the corpus (the first 150 files) does not hold."""
    from retnet.train.data import stdlib_files

    ids: list[int] = []
    for file in stdlib_files()[150:]:
        ids += tokenizer(file.read_text(errors="replace")[:3000])["input_ids"]
        if len(ids) >= count * length:
            break
    return torch.tensor(ids[:count * length]).reshape(count, length)


@torch.no_grad()
def kl_to(teacher: torch.nn.Module, student: torch.nn.Module, blocks: torch.Tensor) -> float:
    """Mean KL(teacher ‖ student) of the next-token distributions over every position of ``blocks``."""
    log_p = F.log_softmax(teacher.eval()(input_ids=blocks).logits.float(), dim=-1)
    log_q = F.log_softmax(student.eval()(input_ids=blocks).logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean().item()


def trained(args: list[str]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model of a run as it starts and as it ends, trained in this process."""
    from retnet.train.trainer import Trainer

    assert args[:2] == ["--config", "tiny"]
    trainer = Trainer(load_config("tiny", args[2:]))
    try:
        start = copy.deepcopy(trainer.raw_model)
        trainer.train()
    finally:
        trainer.close()
    return start, trainer.raw_model


def test_distillation_pulls_the_student_towards_the_teacher(teacher, micro, tmp_path, read_metrics):
    """40 steps of pure distillation cut the student's KL to the teacher on held-out text to under a tenth of its
    start, and to under half a plain run's of the same steps; the records log kd_loss (= loss at alpha 1) and
    ce_loss, the validation records the plain loss."""
    from transformers import AutoTokenizer

    steps = {"train__steps": 40, "optim__lr": 5e-3}
    start, student = trained(distill_args(micro(tmp_path / "kd", **steps), teacher))
    _, plain = trained(micro(tmp_path / "plain", **steps))
    model = RetNetForCausalLM.from_pretrained(teacher)
    blocks = held_out_blocks(AutoTokenizer.from_pretrained(teacher))
    before, after, baseline = (kl_to(model, m, blocks) for m in (start, student, plain))
    # measured: 0.955 at the start, 0.038 after, 0.148 for the plain run
    assert after < 0.1 * before and after < 0.5 * baseline, (before, after, baseline)
    records = read_metrics(tmp_path / "kd")
    assert all(r["kd_loss"] == pytest.approx(r["loss"], rel=1e-6) and r["ce_loss"] > r["kd_loss"] for r in records)
    assert records[-1]["kd_loss"] < 0.5 * records[0]["kd_loss"]
    assert [set(r) for r in read_metrics(tmp_path / "kd", "val")] == [{"kind", "step", "val_loss", "val_ppl",
                                                                        "time"}] * 2
    assert all("kd_loss" not in r for r in read_metrics(tmp_path / "plain"))


def test_at_alpha_0_a_distillation_run_is_a_plain_run(teacher, tokenizer_dir, micro, tmp_path, read_metrics):
    """KD off: the losses and validation losses of a run without a teacher (the teacher's tokenizer is the plain
    run's, its vocabulary the tokenizer's); ce_loss is the loss, kd_loss is logged beside it."""
    assert main(distill_args(micro(tmp_path / "kd"), teacher, distill__alpha=0.0)) == 0
    assert main(micro(tmp_path / "plain")) == 0
    kd, plain = read_metrics(tmp_path / "kd"), read_metrics(tmp_path / "plain")
    assert [r["loss"] for r in kd] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    assert [r["ce_loss"] for r in kd] == pytest.approx([r["loss"] for r in kd], rel=1e-6)
    assert all(r["kd_loss"] > 0 for r in kd)
    assert [r["val_loss"] for r in read_metrics(tmp_path / "kd", "val")] == \
        pytest.approx([r["val_loss"] for r in read_metrics(tmp_path / "plain", "val")], rel=1e-5)


def write_chats(path: Path) -> Path:
    """Conversations (``test_chat_sft``'s), which the teacher's BPE renders with its default chat template."""
    from .test_chat_sft import conversation, write_jsonl

    return write_jsonl(path, [{"messages": conversation(i)} for i in range(240)])


def chat_args(chats, tokenizer_dir, output_dir, **overrides) -> list[str]:
    from .conftest import micro_args

    return micro_args(chats, tokenizer_dir, output_dir.parent / "cache", output_dir, data__format="chat",
                      data__seq_len=64, **overrides)


# test_on_chat_data_only_the_assistant_targets_count (at alpha 0.5, two gloo ranks under DDP against one process) is
# in test_two_ranks_match_one_process.py (TestDistill): its run shares one torchrun launch with other modules' 2-rank
# runs.


def test_a_distillation_run_resumes_exactly(teacher, micro, tmp_path, read_metrics, capsys):
    """Interrupted after its step-3 checkpoint (the log window then holds step 3), it retraces the uninterrupted
    run's records, kd_loss and ce_loss included; the teacher moved elsewhere is still the teacher. Another
    teacher's weights, or another alpha, are refused."""
    out = tmp_path / "run"
    args = distill_args(micro(out, checkpoint__interval=3, logging__log_interval=2, train__eval_interval=3),
                        teacher, distill__temperature=2.0, distill__alpha=0.7)
    assert main(args) == 0
    whole = read_metrics(out) + read_metrics(out, "val")
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    moved = tmp_path / "moved"
    shutil.copytree(teacher, moved)
    assert main([*args, f"--distill.teacher={moved}"]) == 0
    again = read_metrics(out) + read_metrics(out, "val")
    assert [r["step"] for r in again] == [r["step"] for r in whole] == [2, 4, 6, 0, 3, 6]
    strip = [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in again]
    assert strip == [{k: v for k, v in r.items() if k not in ("time", "tokens_per_s")} for r in whole]
    assert {"kd_loss", "ce_loss"} <= set(again[0])
    capsys.readouterr()

    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    model = RetNetForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    model.save_pretrained(other)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    assert main([*args, f"--distill.teacher={other}"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"distill.teacher {str(other)!r}: its weights are not those" in err and "Traceback" not in err, err
    assert main([*args, "--distill.alpha=0.5"]) == EXIT_CONFIG
    assert "distill.alpha: checkpoint 0.7, now 0.5" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("--distill.temperature=0", "distill.temperature must be > 0"),
    ("--distill.temperature=nan", "distill.temperature must be > 0"),
    ("--distill.alpha=1.5", r"distill.alpha must be in \[0, 1\]"),
    ("--distill.kind=js", "distill.kind must be one of"),
])
def test_settings_are_checked(override, message, teacher):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [f"--distill.teacher={teacher}", override])


def test_settings_without_a_teacher_are_refused():
    with pytest.raises(ConfigError, match=r"distill.alpha is set but distill.teacher is empty"):
        load_config("tiny", ["--distill.alpha=0.5"])


def test_what_distillation_does_not_train_under_is_refused(teacher, tmp_path):
    with pytest.raises(ConfigError, match=r"distill.teacher must be .* no such directory"):
        load_config("tiny", [f"--distill.teacher={tmp_path / 'missing'}"])
    for mode, override in (("DPO", ["--data.format=preference", "--data.dataset=pairs.jsonl"]),
                           ("GRPO", ["--data.format=prompts", "--data.dataset=prompts.jsonl"]),
                           ("a reward model", ["--reward.enabled=true", "--data.format=preference",
                                               "--data.dataset=pairs.jsonl"])):
        with pytest.raises(ConfigError, match=f"distill.teacher cannot be used with {mode}"):
            load_config("tiny", [f"--distill.teacher={teacher}", f"--model.init_from={teacher}", *override])
    with pytest.raises(ConfigError, match=r"model.vocab_size cannot be set with distill.teacher"):
        load_config("tiny", [f"--distill.teacher={teacher}", "--model.vocab_size=1024"])
    with pytest.raises(ConfigError, match=r"train.vocab_parallel is not supported with distillation"):
        load_config("tiny", [f"--distill.teacher={teacher}", "--train.tensor_parallel=2", "--train.vocab_parallel=true"])


def test_a_teacher_that_does_not_fit_is_refused_before_the_data_is_read(teacher, micro, tmp_path, capsys,
                                                                         monkeypatch):
    """A teacher of another vocabulary than the student's (named, both sizes), of another tokenizer than the
    run's, without a config, in flash-linear-attention's format (retnet-convert-fla named), without a tokenizer
    while data.tokenizer is unset, or not a hub id the cache holds, stops the run before it reads its data
    (reading and tokenizing a corpus can take hours)."""
    import json

    from retnet.tokenization import train_byte_level_bpe

    from .conftest import save_micro_base

    wider = tmp_path / "wider"
    shutil.copytree(teacher, wider)
    config = RetNetConfig.from_pretrained(teacher)
    vocab = config.vocab_size
    config.vocab_size = vocab + 8
    RetNetForCausalLM(config).save_pretrained(wider)
    student = tmp_path / "student"
    from transformers import AutoTokenizer

    save_micro_base(student, AutoTokenizer.from_pretrained(teacher))
    other_tokenizer = tmp_path / "other-tokenizer"
    train_byte_level_bpe(["def f(x):\n    return x\n" * 50, "class A:\n    pass\n" * 50],
                         vocab_size=300).save_pretrained(other_tokenizer)
    fla = tmp_path / "fla"  # flash-linear-attention's RetNet config.json: the same model_type, its own fields
    shutil.copytree(teacher, fla)
    (fla / "config.json").write_text(json.dumps({
        "model_type": "retnet", "hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "expand_k": 1,
        "expand_v": 2, "attn_mode": "chunk", "vocab_size": vocab}))
    untokenized = tmp_path / "untokenized"
    shutil.copytree(teacher, untokenized, ignore=shutil.ignore_patterns("tokenizer*", "chat_template.jinja"))

    def unread(*args, **kwargs):
        raise AssertionError("the data was built before the teacher was checked")

    monkeypatch.setattr("retnet.train.trainer.build_data", unread)
    cases = [
        ([f"--model.init_from={student}"], wider, f"distill.teacher {str(wider)!r} has vocab_size {vocab + 8}, "
         f"the student (model.init_from {str(student)!r}) {vocab}"),
        ([f"--data.tokenizer={other_tokenizer}"], teacher, "its tokenizer is not the run's"),
        ([], tmp_path, "holds no config.json"),
        ([], fla, f"distill.teacher {str(fla)!r} holds a flash-linear-attention RetNet (its config.json has fla's "
         f"fields), not this package's: convert it first, `retnet-convert-fla {fla} DST`"),
        ([], untokenized, f"distill.teacher {str(untokenized)!r} holds no tokenizer (no tokenizer_config.json or "
         f"tokenizer.json) and data.tokenizer is unset: the student learns the teacher's next-token ids, so set "
         f"data.tokenizer to the tokenizer the teacher was trained with"),
        ([], "acme/not-cached", "the hub could not provide it"),
    ]
    for extra, source, problem in cases:
        out = tmp_path / f"out-{Path(source).name}"
        args = distill_args(micro(out), source)
        if extra and extra[0].startswith("--model.init_from"):  # the student's shape is its own
            args = [a for a in args if not a.startswith("--model.")]
        assert main([*args, *extra]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert problem in err and "Traceback" not in err, err
        assert not (out / "checkpoints").exists()


def test_a_teacher_whose_weights_do_not_match_its_config_is_refused(teacher, micro, tmp_path, capsys):
    """A weight missing from the teacher's safetensors (it would be drawn at random) and one its model has no place
    for are refused, naming them, not distilled from; its tied head (the fixture's: tiny ties it) is no missing
    weight."""
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(teacher, partial)
    weights = load_file(partial / "model.safetensors")
    assert "lm_head.weight" not in weights  # tied: the embedding's
    del weights["model.norm.weight"]
    weights["model.stray.weight"] = torch.zeros(3)
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(distill_args(micro(out), partial)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert (f"distill.teacher {str(partial)!r}: its weights do not match its config.json (missing: "
            f"model.norm.weight; unexpected: model.stray.weight)") in err and "Traceback" not in err, err
    assert not (out / "checkpoints").exists()


def test_only_rank_0_fingerprints_the_teacher(teacher, monkeypatch):
    """The resume check's fingerprint of the teacher (every weight read and hashed) is rank 0's, broadcast: the
    other ranks read none of it. One process computes it itself, as before."""
    import retnet.train.lora
    import retnet.train.trainer as trainer_module
    from retnet.train.trainer import Trainer

    hashed = []
    monkeypatch.setattr(retnet.train.lora, "base_fingerprint", lambda path, setting=None: hashed.append(path) or "a" * 64)
    calls = []

    def stand_in(is_main: bool) -> Trainer:  # what the method reads of a trainer
        trainer = Trainer.__new__(Trainer)
        trainer.is_main, trainer._teacher_path = is_main, teacher
        trainer.cfg = load_config("tiny", [f"--distill.teacher={teacher}"])
        return trainer

    assert stand_in(True)._teacher_fingerprint() == "a" * 64 and hashed == [teacher]  # one process
    hashed.clear()

    def broadcast(objects, src):
        calls.append(src)
        objects[0] = objects[0] or "b" * 64  # rank 0's answer reaches the others

    monkeypatch.setattr(trainer_module, "is_distributed", lambda: True)
    monkeypatch.setattr(trainer_module, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(trainer_module.dist, "broadcast_object_list", broadcast)
    other = stand_in(False)
    assert other._teacher_fingerprint() == "b" * 64 and other._teacher_fingerprint() == "b" * 64
    assert hashed == [] and calls == ["barrier", 0]  # once, then kept
    assert stand_in(True)._teacher_fingerprint() == "a" * 64 and hashed == [teacher]
