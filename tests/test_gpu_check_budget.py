"""benchmarks/gpu_check.sh runs once, inside one `run` call of at most 600 s that kills it whole: its steps' own
timeouts sum to 575 s, and the imports, wheels and packs between them take the rest. Each step's timeout is cut
to what is left of the script's budget, so a slow start shortens the last step (whose log is then packed) instead
of the call being killed before the last pack, which would lose that step's whole log."""

import os
import re
import subprocess
from pathlib import Path

GPU_CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"

# `timeout` records the limit it was given and spends $SPEND seconds of the budget, running nothing.
FAKE_TIMEOUT = """#!/usr/bin/env bash
echo "$1" >> "$LIMITS"
sleep "$SPEND"
"""


def _limits(tmp_path, budget: str | None, spend: str) -> list[int]:
    tree, fake_bin, out = tmp_path / "tree", tmp_path / "bin", tmp_path / "out"
    (tree / "benchmarks" / "results").mkdir(parents=True)
    (tree / "benchmarks" / "gpu_check.sh").write_text(GPU_CHECK.read_text())
    fake_bin.mkdir()
    for name, text in [("timeout", FAKE_TIMEOUT), ("python", "#!/bin/sh\nexit 0\n"), ("torchrun", "#!/bin/sh\n"),
                       ("nvidia-smi", "#!/bin/sh\necho H100\n")]:
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    limits = tmp_path / "limits"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "OUT": str(out), "TMPDIR": str(tmp_path),
           "LIMITS": str(limits), "SPEND": spend}
    env.pop("GPU_CHECK_BUDGET", None)
    if budget is not None:
        env["GPU_CHECK_BUDGET"] = budget
    done = subprocess.run(["bash", str(tree / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "gpu-check.tar.gz").exists()
    return [int(line) for line in limits.read_text().split()]


def test_the_steps_timeouts_fit_the_run_call():
    # as written: what each step may take, and the default budget they are cut to, within `run`'s 600 s
    text = GPU_CHECK.read_text()
    wanted = [int(t) for t in re.findall(r'^timeout "\$\(left (\d+)\)"', text, flags=re.M)]
    assert len(wanted) == len(re.findall(r"^timeout ", text, flags=re.M)) == 8
    assert sum(wanted) <= 575
    assert int(re.search(r"^BUDGET=\$\{GPU_CHECK_BUDGET:-(\d+)\}", text, flags=re.M).group(1)) <= 590


def test_each_step_gets_at_most_what_is_left_of_the_budget(tmp_path):
    limits = _limits(tmp_path / "default", None, "0")
    assert limits == [90, 140, 80, 85, 80, 25, 30, 45]  # a fast start: every step its own timeout
    limits = _limits(tmp_path / "short", "3", "0.5")
    assert len(limits) == 8 and max(limits) <= 3, limits
    assert limits == sorted(limits, reverse=True) and limits[-1] == 1, limits  # later steps, less left
