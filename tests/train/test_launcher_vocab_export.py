"""retnet-train's model vocabulary (model.vocab_size beside a tokenizer), the stale export a reused output_dir
holds, and a config whose return_dict is False (the trainer's own calls read the outputs by name)."""

import json

from retnet.train.__main__ import EXIT_CONFIG, main
from retnet.train.checkpoint import load_checkpoint
from retnet.train.data import load_tokenizer, vocab_bound


def _stale_export(out):
    export = out / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text(json.dumps({"stale": True}))
    return export


def test_padded_vocab_return_dict_false_and_stale_exports(micro, tmp_path, tokenizer_dir, capfd):
    """model.vocab_size above the tokenizer's size pads the embedding (nanoGPT's 50257 -> 50304); a config with
    return_dict False trains (the trainer asks for the outputs by name); a fresh run removes the export an earlier
    run left in its output_dir, and an explicit resume that abandons later checkpoints sets their export aside."""
    bound = vocab_bound(load_tokenizer(tokenizer_dir))
    out = tmp_path / "run"
    _stale_export(out)
    args = micro(out, train__steps=2, checkpoint__interval=1, model__vocab_size=bound + 88,
                 **{"model.extra.return_dict": "false"})
    assert main(args) == 0
    assert not (out / "export").exists()  # another run's: gone as soon as this one started
    # (micro runs write no export: the warning does not promise one)
    assert "earlier run in this train.output_dir (this run writes none: checkpoint.export=false)" in capfd.readouterr().err
    state = load_checkpoint(out / "checkpoints" / "step_00000002")["model"]
    assert state["model.embed_tokens.weight"].shape[0] == bound + 88
    assert state["lm_head.weight"].shape[0] == bound + 88

    # The export of step 2's trajectory, which a resume from step 1 abandons with its checkpoint. The resume keeps
    # the checkpoint's vocabulary without being told it again.
    _stale_export(out)
    resume = micro(out, train__steps=2, **{"model.extra.return_dict": "false"})
    assert main([*resume, f"--train.resume={out / 'checkpoints' / 'step_00000001'}"]) == 0
    assert not (out / "export").exists()
    aside = [p.name for p in out.iterdir() if p.name.startswith("export.abandoned-")]
    assert len(aside) == 1 and json.loads((out / aside[0] / "config.json").read_text()) == {"stale": True}


def test_a_vocab_size_below_the_tokenizers_is_refused_by_name(micro, tmp_path, tokenizer_dir, capsys):
    bound = vocab_bound(load_tokenizer(tokenizer_dir))
    out = tmp_path / "run"
    assert main(micro(out, model__vocab_size=100)) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "model.vocab_size" in err and "100" in err and str(bound) in err and "Traceback" not in err
