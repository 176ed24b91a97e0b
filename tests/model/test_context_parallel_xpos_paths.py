"""Context parallelism with xPos: a row split along time across real torchrun (gloo) ranks runs each piece in xPos
frames of its own and moves the state crossing a cut into the receiving piece's frame, giving the whole row's
outputs, loss and gradients in one process (2 and 3 pieces; packed rows with documents crossing the cuts, plain
rows in several frames a piece, positions whose scales from one origin lie beyond fp32); and a training run split
in two logs one process's losses from an xPos ``model.init_from``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from retnet.model.context_parallel import ContextShard, incoming_state, shard_sequences
from tests.launch import launch_worker
from tests.train.conftest import metrics, micro_args, one_thread, run_train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the cases, shared with the torchrun worker (pytest runs in importlib mode)
from context_parallel_cases import XPOS_CASES, build_case  # noqa: E402

# One launch of 3 ranks: the 2-piece rows on its first two (a group of their own), then the 3-piece rows.
RUNS = [(name, pieces) for pieces in (2, 3) for name in XPOS_CASES]


@pytest.fixture(scope="module")
def ranks_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp-xpos")
    (out / "cases.json").write_text(json.dumps(RUNS))
    launch_worker(HERE / "context_parallel_worker.py", out, 3)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(3)]


@pytest.mark.parametrize("name, pieces", RUNS, ids=[f"{name}-{pieces}" for name, pieces in RUNS])
def test_xpos_pieces_give_the_whole_rows_outputs_loss_and_gradients(ranks_results, name, pieces):
    model, input_ids, labels, cu_seqlens, mode = build_case(name, pieces)
    whole = model(input_ids=input_ids, labels=labels, cu_seqlens=cu_seqlens, retention_mode=mode, use_cache=False,
                  output_hidden_states=True)
    whole.loss.backward()
    results = [ranks_results[rank][f"{name}@{pieces}"] for rank in range(pieces)]
    hidden = torch.cat([piece["hidden"] for piece in results], 1)
    assert torch.isfinite(hidden).all()
    torch.testing.assert_close(hidden, whole.hidden_states[-1].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(piece["loss"] for piece in results), whole.loss.detach(), rtol=1e-5, atol=1e-6)
    for param_name, param in model.named_parameters():
        summed = sum(piece["grads"][param_name] for piece in results)
        torch.testing.assert_close(summed, param.grad, rtol=1e-5, atol=1e-5, msg=param_name)


def test_the_fold_moves_each_carried_state_into_the_next_pieces_frame(monkeypatch):
    """One process: a state carried through a continuing piece is decayed by γ^L and moved by its xPos factor."""
    states = torch.rand(4, 1, 2, 3, 3)
    monkeypatch.setattr("retnet.model.context_parallel._GatherStates.apply", lambda state, shard: states)
    log_decay = torch.log(torch.tensor([0.5, 0.9]))
    gamma = torch.exp(log_decay)[None, :, None, None]
    carry_shifts = torch.rand(4, 1, 3, 1)
    # piece 0 holds two sequences, piece 1 continues the second (single): states[0] passes through it
    shard = ContextShard(2, 4, (5, 5, 5, 5), (0, 3, 4, 2), (False, True, True, True))
    torch.testing.assert_close(incoming_state(states[2], log_decay, shard, carry_shifts),
                               states[0] * gamma ** 5 * carry_shifts[1] + states[1])
    shard = ContextShard(3, 4, (5, 5, 5, 5), (0, 3, 4, 2), (False, True, True, True))
    torch.testing.assert_close(incoming_state(states[3], log_decay, shard, carry_shifts),
                               (states[0] * gamma ** 5 * carry_shifts[1] + states[1]) * gamma ** 5 * carry_shifts[2]
                               + states[2])


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "rows"])
def test_one_xpos_piece_is_the_plain_forward(model_factory, packed):
    """Its own frames (from the piece's first position, several a piece unpacked) give the plain forward's."""
    model = model_factory(use_xpos=True, xpos_scale_base=2.0, chunk_size=8)
    input_ids = torch.randint(2, 101, (1 if packed else 2, 45), generator=torch.Generator().manual_seed(0))
    cu_seqlens = torch.tensor([0, 7, 30, 45], dtype=torch.int32) if packed else None
    inputs, shard, targets = shard_sequences(input_ids, input_ids, 0, 1, cu_seqlens)
    split = model(**inputs, context_parallel=shard, num_items_in_batch=targets)
    plain = model(input_ids=input_ids, labels=input_ids, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(split.logits, plain.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.loss, plain.loss)


def test_a_packed_piece_past_one_frame_is_refused_by_name(model_factory):
    """A packed row runs each sequence in one frame (the kernels take no per-sequence frames): a piece holding more
    of one document than a frame covers (48 positions at xpos_scale_base 1) is refused, naming the way out."""
    model = model_factory(use_xpos=True, xpos_scale_base=1.0, chunk_size=8)
    input_ids = torch.randint(2, 101, (1, 120))
    inputs, shard, _ = shard_sequences(input_ids, None, 0, 2, torch.tensor([0, 100, 120], dtype=torch.int32))
    with pytest.raises(ValueError, match="more context-parallel ranks"):
        model(**inputs, context_parallel=shard)


@pytest.mark.slow
def test_an_xpos_model_split_across_two_ranks_logs_the_losses_of_one_process(tmp_path, tmp_path_factory):
    """``--train.context_parallel=2`` on a ``model.init_from`` saved with xPos
    (xpos_scale_base 4): packed rows of 3 × 32 tokens cut at 48, inside a document, log one process's training and
    validation losses."""
    from retnet.model import RetNetConfig, RetNetForCausalLM
    from retnet.tokenization import train_byte_level_bpe
    from retnet.train.__main__ import main
    from retnet.train.data import stdlib_files, vocab_bound

    texts = [file.read_text(errors="replace")[:3000] for file in stdlib_files()[:60]]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    base = tmp_path / "base"
    tokenizer = train_byte_level_bpe(texts, vocab_size=512)
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    config = RetNetConfig.from_preset("tiny", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      chunk_size=16, vocab_size=vocab_bound(tokenizer), use_xpos=True,
                                      xpos_scale_base=4.0, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    RetNetForCausalLM(config).save_pretrained(base)

    def args(out, **overrides):
        values = micro_args(corpus, base, tmp_path_factory.mktemp("cache"), out, train__steps=3,
                            train__eval_interval=3, train__micro_batch_size=3, train__global_batch_size=6,
                            optim__lr=1e-2, optim__schedule="constant", **overrides)
        # the architecture is init_from's: micro_args' shape settings are refused beside it
        shapes = ("--model.hidden_size", "--model.num_hidden_layers", "--model.num_attention_heads")
        # xPos comes from init_from's config.json alone (the trainer refused it there under context parallelism)
        return [*(a for a in values if not a.startswith(shapes)), f"--model.init_from={base}"]

    single, split = tmp_path / "single", tmp_path / "split"
    with one_thread():
        assert main(args(single)) == 0
    two = run_train(args(split, train__context_parallel=2), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-2000:]
    expected = [r["loss"] for r in metrics(single)]
    assert len(expected) == 3 and expected[0] != expected[-1]
    assert [r["loss"] for r in metrics(split)] == pytest.approx(expected, rel=1e-5)
    assert [r["val_loss"] for r in metrics(split, "val")] == pytest.approx(
        [r["val_loss"] for r in metrics(single, "val")], rel=1e-5)
