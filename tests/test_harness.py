"""lm-evaluation-harness (``lm_eval``) on RetNet, offline: two tiny local tasks (multiple choice, scored by
loglikelihood; generate_until) on a micro random RetNet, through both ways in.

- ``retnet-lm-eval --model hf`` as a real subprocess (RetNet registered by the script): its results JSON, its
  per-sample loglikelihoods against the model's own fp32 forward (lm-eval runs right-padded batches), its
  generations against greedy ``model.generate`` one prompt at a time (lm-eval runs left-padded batches);
- ``local-completions`` against a real ``retnet-serve`` server (its uvicorn over loopback HTTP, in a thread of
  the test's process: token-id prompts, several per request, with echo + logprobs + ``max_tokens: 1``), through
  lm-eval's Python API: the same loglikelihoods, greedy flags, accuracy and generations as ``hf``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import retnet  # noqa: F401  (registers the Auto classes)
from tests.serve.conftest import CORPUS, ThreadServer, save_micro_model

REPO = Path(__file__).resolve().parents[1]
BATCH = 4  # hf: padded batches of 4; local-completions: 4 prompts per request (retnet-serve allows 16)
MAX_GEN_TOKS = 8
# Multiple choice: contexts (no trailing whitespace: lm-eval would move it into the continuation) ...
CONTEXTS = [
    "def add(a, b):\n    return",
    "class Stack:\n    def __init__(self):\n        self.items =",
    "for i in range(10):\n    print(",
    "The retention mechanism replaces attention with a",
    "Hello world! How are you",
    "A recurrent state of fixed size carries the whole",
    "Unicode: café, naïve,",
    "def main():\n    for i in range(",
]
# ... and the other choices, each several tokens (the first choice of every doc is one token, see below).
DISTRACTORS = [" a + b", " print(i)", " class Stack:", " hello world", "self.items", " emoji 🙂"]
GEN_PROMPTS = ["def add(a, b):", "The retention mechanism", "for i in range(10):\n    print(i * i)"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A micro random RetNet and the project's byte-level BPE, saved as a training run exports them."""
    from retnet.tokenization import train_byte_level_bpe

    path = tmp_path_factory.mktemp("harness-export")
    return save_micro_model(path, train_byte_level_bpe(CORPUS, vocab_size=384, min_frequency=1))


@pytest.fixture(scope="module")
def reference(export_dir):
    """The model and tokenizer as loaded here, fp32, for the direct computations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(export_dir)


def loglikelihood(reference, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether every continuation token is the argmax, from one unpadded fp32
    forward. Split as lm-eval splits a pair: the whole text tokenized once, the context's tokens cut off."""
    model, tokenizer = reference
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)[n_context - 1:]
    targets = torch.tensor(whole[n_context:])
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    return picked.sum().item(), bool((logprobs.argmax(-1) == targets).all())


def greedy_text(reference, prompt: str) -> str:
    """What greedy ``generate`` continues ``prompt`` with, alone (no padding), decoded as lm-eval decodes."""
    model, tokenizer = reference
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_GEN_TOKS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def one_token_choice(reference, context: str) -> str:
    """The text of the most likely next token after ``context`` that tokenizes back to it after the context
    (so lm-eval scores that text as that one token): mostly the argmax, so lm-eval's greedy flag is true."""
    model, tokenizer = reference
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ranked = model(torch.tensor([ids])).logits[0, -1].argsort(descending=True).tolist()
    for token in ranked:
        text = tokenizer.decode([token])
        if token in tokenizer.all_special_ids or not text or "\ufffd" in text:
            continue
        if tokenizer(context + text, add_special_tokens=False)["input_ids"] == [*ids, token]:
            return text
    raise AssertionError(f"no token continues {context!r} as itself")


@pytest.fixture(scope="module")
def tasks(export_dir, reference, tmp_path_factory):
    """Two lm-eval tasks in a directory for ``--include_path``: ``tiny_mc`` (8 docs, 4 choices: a likely next
    token, mostly the argmax, and three longer distractors; the gold label alternates between them, so
    accuracy is neither 0 nor 1) and ``tiny_gen`` (3 prompts, 8 tokens, stopped by a string the model generates).
    The YAML files are written as JSON, which YAML reads."""
    root = tmp_path_factory.mktemp("harness-tasks")
    docs = []
    for i, context in enumerate(CONTEXTS):
        others = [DISTRACTORS[(i + k) % len(DISTRACTORS)] for k in range(3)]
        docs.append({"context": context, "choices": [one_token_choice(reference, context), *others],
                     "label": 0 if i % 2 == 0 else 1 + i % 3})

    texts = [greedy_text(reference, prompt) for prompt in GEN_PROMPTS]
    # A stop string the first prompt's generation holds past its start, so lm-eval's stopping (hf: a stopping
    # criterion on the batch; the server: `stop`) and its cut of the text are exercised.
    stop = next(c for c in texts[0][2:] if c.isprintable() and not c.isspace() and c != "\ufffd")
    gen_docs = [{"prompt": prompt, "answer": text.split(stop)[0]} for prompt, text in zip(GEN_PROMPTS, texts)]

    cache = str(root / "datasets-cache")
    common = {"dataset_path": "json", "test_split": "test", "num_fewshot": 0}
    (root / "mc.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (root / "tiny_mc.yaml").write_text(json.dumps({
        "task": "tiny_mc", **common,
        "dataset_kwargs": {"data_files": {"test": str(root / "mc.jsonl")}, "cache_dir": cache},
        "output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
        "doc_to_target": "label", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }))
    (root / "gen.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in gen_docs))
    (root / "tiny_gen.yaml").write_text(json.dumps({
        "task": "tiny_gen", **common,
        "dataset_kwargs": {"data_files": {"test": str(root / "gen.jsonl")}, "cache_dir": cache},
        "output_type": "generate_until", "doc_to_text": "prompt", "doc_to_target": "answer",
        "generation_kwargs": {"until": [stop], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }))
    return {"dir": root, "mc": docs, "gen": gen_docs, "stop": stop, "texts": texts}


@pytest.fixture(scope="module")
def server(export_dir):
    """``retnet-serve``'s server (its flags, app and uvicorn, real HTTP on a loopback port) in a thread of this
    process: what it answers is the test, not its process (a process would import torch and transformers again,
    ~10 CPU-s; the suite's ``retnet-serve`` process tests are in tests/serve)."""
    proc = ThreadServer(export_dir)
    yield proc
    proc.stop()


def env_offline(tmp: Path) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                HF_DATASETS_CACHE=str(tmp / "datasets"), HF_HOME=str(tmp / "hf-home"))


def sample_results(samples: list[dict]) -> list[list]:
    """Each doc's responses in doc order: per choice ``(loglikelihood, is_greedy)``, or the generated text.
    The results file holds them as strings, the Python API as floats and bools."""
    out = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        resps = [r[0] for r in sample["resps"]]
        if isinstance(resps[0], str):
            out.append(resps[0])
        else:
            out.append([(float(ll), greedy in (True, "True")) for ll, greedy in resps])
    return out


@pytest.fixture(scope="module")
def hf_run(export_dir, tasks, tmp_path_factory):
    """``retnet-lm-eval --model hf ... --output_path OUT --log_samples`` as a subprocess; its results files."""
    script = shutil.which("retnet-lm-eval", path=str(Path(sys.executable).parent))
    assert script, "the retnet-lm-eval console script is not installed: pip install -e '.[dev]'"
    tmp = tmp_path_factory.mktemp("harness-hf")
    done = subprocess.run(
        [script, "--model", "hf", "--model_args", f"pretrained={export_dir},dtype=float32",
         "--tasks", "tiny_mc,tiny_gen", "--include_path", str(tasks["dir"]), "--device", "cpu",
         "--batch_size", str(BATCH), "--output_path", str(tmp / "out"), "--log_samples"],
        cwd=tmp, env=env_offline(tmp), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (results_file,) = (tmp / "out").rglob("results_*.json")
    samples = {task: [json.loads(line) for line in next((tmp / "out").rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
               for task in ("tiny_mc", "tiny_gen")}
    return {"results": json.loads(results_file.read_text()), "samples": samples, "stdout": done.stdout}


@pytest.fixture(scope="module")
def api_run(tasks, server, export_dir):
    """The same tasks through ``local-completions`` against the server, by lm-eval's Python API in-process
    (the global RNGs it seeds are restored afterwards)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    server.wait_healthy()
    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            out = simple_evaluate(
                model="local-completions",
                model_args={"base_url": f"{server.url}/v1/completions", "tokenizer": str(export_dir),
                            "model": "micro", "tokenized_requests": True, "max_retries": 1},
                tasks=["tiny_mc", "tiny_gen"], batch_size=BATCH, log_samples=True,
                task_manager=TaskManager(include_path=str(tasks["dir"]), include_defaults=False))
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    return out


def test_console_script_and_extras_declared():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from retnet import harness

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["retnet-lm-eval"] == "retnet.harness:main"
    assert any(dep.startswith("lm_eval[hf,api]>=0.4.10,<0.5") for dep in project["optional-dependencies"]["eval"])
    assert any("eval" in dep for dep in project["optional-dependencies"]["dev"] if dep.startswith("retnet-stack["))
    assert callable(harness.lm_eval_cli())


def test_main_passes_arguments_unchanged(monkeypatch):
    from retnet import harness

    seen = []
    monkeypatch.setattr(harness, "lm_eval_cli", lambda: lambda: seen.append(list(sys.argv[1:])))
    before = list(sys.argv)
    harness.main(["--model", "hf", "--model_args", "pretrained=x,dtype=float32", "--tasks", "a,b"])
    assert seen == [["--model", "hf", "--model_args", "pretrained=x,dtype=float32", "--tasks", "a,b"]]
    assert sys.argv == before


@pytest.mark.slow
def test_hf_cli_writes_results(hf_run, tasks):
    results = hf_run["results"]
    assert results["config"]["model"] == "hf"
    assert results["n-samples"]["tiny_mc"]["effective"] == 8 and results["n-samples"]["tiny_gen"]["effective"] == 3
    assert 0 <= results["results"]["tiny_mc"]["acc,none"] <= 1
    assert "exact_match,none" in results["results"]["tiny_gen"]
    assert "tiny_mc" in hf_run["stdout"]  # lm-eval's table


@pytest.mark.slow
def test_hf_loglikelihoods_equal_the_model_forward(hf_run, tasks, reference):
    """Right-padded batches of 4 (no attention mask: causal, so the padding after a row changes nothing) give
    each pair's loglikelihood and greedy flag of an unpadded fp32 forward, and so the accuracy."""
    got = sample_results(hf_run["samples"]["tiny_mc"])
    want = [[loglikelihood(reference, doc["context"], choice) for choice in doc["choices"]] for doc in tasks["mc"]]
    for doc_got, doc_want in zip(got, want, strict=True):
        assert [g for _, g in doc_got] == [g for _, g in doc_want]
        assert [ll for ll, _ in doc_got] == pytest.approx([ll for ll, _ in doc_want], abs=1e-4)
    assert any(doc[0][1] for doc in want)  # some one-token choices are the argmax: the flag is tested both ways
    acc = np.mean([int(np.argmax([ll for ll, _ in doc])) == d["label"] for doc, d in zip(want, tasks["mc"])])
    assert 0 < acc < 1
    assert hf_run["results"]["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)


@pytest.mark.slow
def test_hf_generate_until_equals_greedy_generate(hf_run, tasks):
    """A left-padded batch of 3 prompts through our recurrent-cache ``generate``, stopped by lm-eval's stop
    criterion, gives each prompt's greedy text alone, cut at the stop string."""
    got = sample_results(hf_run["samples"]["tiny_gen"])
    assert got == [doc["answer"] for doc in tasks["gen"]]
    assert tasks["stop"] in tasks["texts"][0] and got[0] != tasks["texts"][0]  # the stop string did cut
    assert hf_run["results"]["results"]["tiny_gen"]["exact_match,none"] == 1.0


@pytest.mark.slow
def test_local_completions_against_the_server_equals_hf(api_run, hf_run):
    """Token-id prompts, 4 per request, echo + logprobs + max_tokens 1: the server's echoed logprobs give the
    loglikelihoods, greedy flags and accuracy of ``hf``; its greedy completions with ``stop`` the same texts."""
    hf_mc = sample_results(hf_run["samples"]["tiny_mc"])
    api_mc = sample_results(api_run["samples"]["tiny_mc"])
    for doc_api, doc_hf in zip(api_mc, hf_mc, strict=True):
        assert [g for _, g in doc_api] == [g for _, g in doc_hf]
        assert [ll for ll, _ in doc_api] == pytest.approx([ll for ll, _ in doc_hf], abs=1e-3)
    assert api_run["results"]["tiny_mc"]["acc,none"] == hf_run["results"]["results"]["tiny_mc"]["acc,none"]
    assert sample_results(api_run["samples"]["tiny_gen"]) == sample_results(hf_run["samples"]["tiny_gen"])
    assert api_run["results"]["tiny_gen"]["exact_match,none"] == 1.0


def test_hf_picks_the_causal_backend_for_retnet_without_a_warning(monkeypatch):
    """``import retnet`` lists RetNet among transformers' causal LMs, the table lm-eval's ``hf`` reads to pick its
    backend: no "HF model type is neither marked as CausalLM or Seq2SeqLM" warning, no ``backend=causal`` needed."""
    import lm_eval.models.huggingface as hf

    from retnet.model import RetNetConfig

    warned = []
    monkeypatch.setattr(hf.eval_logger, "warning", lambda message, *args, **kwargs: warned.append(message))
    model = hf.HFLM.__new__(hf.HFLM)  # only the backend guess runs: no weights loaded
    model._get_backend(RetNetConfig.from_preset("tiny"))
    assert model.backend == "causal"
    assert not [m for m in warned if "neither marked" in m], warned
