"""Two gloo ranks against one process, for the fine-tuning objectives of other modules: DPO (test_preference), a
reward model (test_reward), LoRA under FSDP2 (test_lora), a fine-tune of an export under DDP (test_init_from),
distillation on chat data (test_distill). Each test is its module's (its name, its assertions), in a class named
after that module; they are here so that their 2-rank runs share one torchrun launch (a rank's start, ~10 s of
CPU importing torch and transformers, dwarfs a micro run), built from the helpers of those modules."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from retnet.train.__main__ import main
from retnet.train.checkpoint import list_checkpoints, load_checkpoint
from retnet.train.preference import METRICS as DPO_METRICS
from retnet.train.preference import REFERENCE_FILE
from retnet.train.reward import METRICS as REWARD_METRICS
from tests.launch import selected_tests

from .conftest import micro_args, run_train_many
from .test_distill import chat_args, distill_args, write_chats
from .test_init_from import fine_tune_args
from .test_lora import train_base, tune, write_domain
from .test_preference import assert_records_match, dpo_args, toy, train_dpo  # noqa: F401 - toy: the fixture
from .test_reward import reward_args, train_reward

PREFERENCE = "TestPreference::test_two_gloo_ranks_match_one_process"
REWARD = "TestReward::test_two_gloo_ranks_match_one_process"
LORA = "TestLora::test_fsdp_lora_follows_one_process"
INIT_FROM = "TestInitFrom::test_fine_tuning_under_ddp_matches_one_process"
DISTILL = "TestDistill::test_on_chat_data_only_the_assistant_targets_count"
DISTILL_COMMON = {"distill__alpha": 0.5, "distill__temperature": 2.0, "train__steps": 4}


# The one-process runs the 2-rank runs are compared with (the original modules' fixtures, by their helpers)
@pytest.fixture(scope="module")
def dpo_trained(toy, tmp_path_factory):  # noqa: F811 - toy: the fixture
    return train_dpo(toy, tmp_path_factory.mktemp("dpo") / "run")


@pytest.fixture(scope="module")
def reward_trained(toy, tmp_path_factory):  # noqa: F811 - toy: the fixture
    return train_reward(toy, tmp_path_factory.mktemp("reward") / "run")


@pytest.fixture(scope="module")
def lora_tuned(tmp_path_factory, corpus, tokenizer_dir, cache_dir):
    """test_lora's ``tuned``: (output directory, arguments, the trained model)."""
    pretrained = train_base(tmp_path_factory.mktemp("lora-base"), corpus, tokenizer_dir, cache_dir)
    domain = write_domain(tmp_path_factory.mktemp("lora-domain") / "domain.jsonl")
    return tune(tmp_path_factory.mktemp("lora") / "tuned", domain, tokenizer_dir, pretrained)


# The exports the fine-tune and the distillation start from: test_init_from's pretrain and test_distill's
# train_teacher, trained 10 steps instead of 60 on the session's token cache (those modules' tests read how far
# their 60 steps got; here only that two ranks and one process start from the same weights, not the seed's)
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus, tokenizer_dir, cache_dir):
    """A micro run trained 10 steps and exported: its output directory."""
    out = tmp_path_factory.mktemp("pretrained") / "run"
    assert main(micro_args(corpus, tokenizer_dir, cache_dir, out, checkpoint__export=True, train__steps=10,
                           optim__lr=1e-2)) == 0
    return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, corpus, tokenizer_dir, cache_dir):
    """A micro teacher (hidden 64, twice the students') trained 10 steps and exported: the export."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(micro_args(corpus, tokenizer_dir, cache_dir, out, checkpoint__export=True, train__steps=10,
                           optim__lr=1e-2, model__hidden_size=64)) == 0
    return out / "export"


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    return write_chats(tmp_path_factory.mktemp("chats") / "chats.jsonl")


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory, corpus, tokenizer_dir, cache_dir) -> SimpleNamespace:
    """The selected tests' 2-rank runs in one torchrun launch, each as ``name: (output directory, finished run)``
    (``dpo``, ``reward``, ``lora``, ``init_from``, ``distill``), after the one-process runs they are compared with
    (as each test ran them before its own launch: the token caches they share are written by one process);
    ``init_from_single`` and ``distill_single``: the one-process runs made here."""
    chosen, root = selected_tests(request), tmp_path_factory.mktemp("two-ranks")
    runs, done = {}, SimpleNamespace()
    if PREFERENCE in chosen:  # micro 2 × accum 1 × 2 ranks; the one-process run: micro 2 × accum 2
        request.getfixturevalue("dpo_trained")
        runs["dpo"] = (root / "dpo", dpo_args(request.getfixturevalue("toy"), root / "dpo"))
    if REWARD in chosen:
        request.getfixturevalue("reward_trained")
        runs["reward"] = (root / "reward", reward_args(request.getfixturevalue("toy"), root / "reward"))
    if LORA in chosen:  # the one-process fine-tune's arguments, under FSDP2
        _, args, _ = request.getfixturevalue("lora_tuned")
        fsdp = root / "fsdp"
        args = [a if not a.startswith("--train.output_dir=") else f"--train.output_dir={fsdp}" for a in args]
        runs["lora"] = (fsdp, [*args, "--train.parallelism=fsdp"])
    if INIT_FROM in chosen:
        export = request.getfixturevalue("pretrained") / "export"
        single, ddp = root / "init-from" / "single", root / "init-from" / "ddp"
        assert main(fine_tune_args(micro_args(corpus, tokenizer_dir, cache_dir, single), export)) == 0
        done.init_from_single = single
        runs["init_from"] = (ddp, fine_tune_args(micro_args(corpus, tokenizer_dir, cache_dir, ddp), export))
    if DISTILL in chosen:
        teacher, chats = request.getfixturevalue("teacher"), request.getfixturevalue("chats")
        single, ddp = root / "distill" / "single", root / "distill" / "ddp"  # a token cache in distill/cache
        assert main(distill_args(chat_args(chats, tokenizer_dir, single), teacher, **DISTILL_COMMON)) == 0
        done.distill_single = single
        runs["distill"] = (ddp, distill_args(chat_args(chats, tokenizer_dir, ddp), teacher, **DISTILL_COMMON))
    finished = run_train_many([args for _, args in runs.values()], 2, root / "launch") if runs else []
    for (name, (out, _)), run in zip(runs.items(), finished, strict=True):
        setattr(done, name, (out, run))
    return done


class TestPreference:
    @pytest.mark.slow
    def test_two_gloo_ranks_match_one_process(self, two_ranks, dpo_trained):
        """DDP, micro 2 × accum 1 × 2 ranks: the reference split over the ranks and all-gathered, the losses,
        rewards and validation records of the one-process run (micro 2 × accum 2)."""
        trained = dpo_trained
        ddp, done = two_ranks.dpo
        assert done.returncode == 0, done.stderr + done.stdout
        assert "world 2 × micro 2 × accum 1" in done.stderr
        assert_records_match(trained, ddp, DPO_METRICS, tolerance=1e-5)
        assert torch.load(ddp / REFERENCE_FILE)["train"].allclose(torch.load(trained / REFERENCE_FILE)["train"],
                                                                  atol=1e-5)


class TestReward:
    @pytest.mark.slow
    def test_two_gloo_ranks_match_one_process(self, two_ranks, reward_trained):
        """DDP, micro 2 × accum 1 × 2 ranks: the losses, rewards and validation records of the one-process run
        (micro 2 × accum 2): the metrics are global-batch means. (To 1e-3: the gradients are summed in another
        order, and at lr 1e-2 the steps' rounding differences grow, by step 6, to 1e-5..2e-4 of a reward, depending
        on the CPU's vector width; a metric averaged wrongly across ranks is off by far more.)"""
        trained = reward_trained
        ddp, done = two_ranks.reward
        assert done.returncode == 0, done.stderr + done.stdout
        assert "world 2 × micro 2 × accum 1" in done.stderr
        assert_records_match(trained, ddp, REWARD_METRICS, tolerance=1e-3)


class TestLora:
    def test_fsdp_lora_follows_one_process(self, two_ranks, lora_tuned, read_metrics):
        """Two gloo ranks under FSDP2 (fully_shard per layer over frozen weights and adapters together) retrace
        the one-process run: the same losses, sharded checkpoints of only the adapters, the same merged export."""
        from safetensors.torch import load_file

        out, _, model = lora_tuned
        fsdp, done = two_ranks.lora
        assert done.returncode == 0, done.stderr[-3000:]
        assert [r["loss"] for r in read_metrics(fsdp)] == pytest.approx([r["loss"] for r in read_metrics(out)],
                                                                        rel=1e-6)
        last = list_checkpoints(fsdp / "checkpoints")[-1]
        assert json.loads((last / "manifest.json").read_text())["layout"] == "sharded"
        saved = load_checkpoint(last)["model"]
        assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
        merged = load_file(fsdp / "export" / "model.safetensors")
        expected = load_file(out / "export" / "model.safetensors")
        assert merged.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6)
        assert (fsdp / "export" / "adapter" / "adapter_model.safetensors").is_file()


class TestInitFrom:
    def test_fine_tuning_under_ddp_matches_one_process(self, two_ranks, read_metrics):
        """Every rank loads the same weights before DDP wraps them: two gloo ranks follow one process."""
        single = two_ranks.init_from_single
        ddp, done = two_ranks.init_from
        assert done.returncode == 0, done.stderr[-3000:]
        assert [r["loss"] for r in read_metrics(ddp)] == pytest.approx([r["loss"] for r in read_metrics(single)],
                                                                       rel=1e-4)
        assert torch.isfinite(torch.tensor([r["loss"] for r in read_metrics(ddp)])).all()


class TestDistill:
    def test_on_chat_data_only_the_assistant_targets_count(self, two_ranks, teacher, chats, tokenizer_dir, tmp_path,
                                                            read_metrics):
        """Chat data (packed conversations, assistant-only targets, the global batch's target count as the
        denominator): at alpha 0 the plain chat run's losses; at alpha 0.5, two gloo ranks under DDP log the one
        process's loss, kd_loss, ce_loss and gradient norms."""
        assert main(distill_args(chat_args(chats, tokenizer_dir, tmp_path / "kd0"), teacher,
                                 distill__alpha=0.0)) == 0
        assert main(chat_args(chats, tokenizer_dir, tmp_path / "plain")) == 0
        assert [r["loss"] for r in read_metrics(tmp_path / "kd0")] == \
            pytest.approx([r["loss"] for r in read_metrics(tmp_path / "plain")], rel=1e-5)
        # the one-process run (DISTILL_COMMON's settings) and the 2-rank one: two_ranks's
        ddp, two = two_ranks.distill
        assert two.returncode == 0, two.stderr[-3000:]
        single, ddp = read_metrics(two_ranks.distill_single), read_metrics(ddp)
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm"):
            assert [r[key] for r in ddp] == pytest.approx([r[key] for r in single], rel=1e-4), key
        assert all(r["loss"] == pytest.approx(0.5 * r["kd_loss"] + 0.5 * r["ce_loss"], rel=1e-5) for r in single)
