"""What the README's walkthrough runs, checked where no other test runs it: the Docker training image's entrypoint
(no Docker engine on the CI machine, so the image's torchrun command line is resolved here as torchrun resolves it)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]


def dockerfile_stages(path: Path) -> dict[str, dict]:
    """Each stage's ENV values and exec-form ENTRYPOINT/CMD, by stage name (`final` for the unnamed last one)."""
    stages: dict[str, dict] = {}
    current: dict | None = None
    for line in path.read_text().splitlines():
        if match := re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line):
            current = {"from": match[1], "env": {}}
            stages[match[2] or "final"] = current
        elif current is not None and (match := re.match(r"ENV\s+(.+)", line)):
            for key, value in re.findall(r"(\w+)=(\S+)", match[1]):
                current["env"][key] = value
        elif current is not None and (match := re.match(r"(ENTRYPOINT|CMD)\s+(\[.*\])", line)):
            current[match[1].lower()] = json.loads(match[2])
    return stages


def ranks_started(stages: dict[str, dict], base: str, cpu_cores: int, extra_env: dict | None = None):
    """The ranks torchrun starts for the image's default command (built with BASE=``base``) on a machine without
    an accelerator and with ``cpu_cores`` cores, and the training arguments each rank gets."""
    from torch.distributed import run as torchrun

    final = stages["final"]
    assert final["from"] == "base-${BASE}"
    env = {**stages[f"base-{base}"]["env"], **final["env"], **(extra_env or {})}
    assert final["entrypoint"][0] == "torchrun"
    with mock.patch.dict("os.environ", env):
        args = torchrun.get_args_parser().parse_args(final["entrypoint"][1:] + final["cmd"])
    with mock.patch("torch.accelerator.is_available", return_value=False), \
            mock.patch("torch._utils.cpu_count", return_value=cpu_cores):
        ranks = torchrun.determine_local_world_size(args.nproc_per_node)
    return ranks, args.training_script_args


@pytest.mark.parametrize("cpu_cores", [2, 16])
def test_the_cpu_training_image_trains_its_default_preset_on_a_machine_of_many_cores(cpu_cores):
    # torchrun's --nproc-per-node=auto started a rank per core, and the tiny preset's batch (16 rows of a
    # micro-batch of 16) divides by no world size above 1: `docker compose up` stopped before training.
    from retnet.train.__main__ import _parser
    from retnet.train.config import load_config

    ranks, script_args = ranks_started(dockerfile_stages(REPO / "docker" / "Dockerfile.train"), "cpu", cpu_cores)
    assert ranks == 1
    known, overrides = _parser().parse_known_args(script_args)
    load_config(known.config, overrides).train.grad_accum_steps(ranks)


def test_the_training_image_takes_another_rank_count_from_the_environment():
    ranks, _ = ranks_started(dockerfile_stages(REPO / "docker" / "Dockerfile.train"), "cpu", 16,
                             {"PET_NPROC_PER_NODE": "4"})
    assert ranks == 4


def test_the_cuda_training_image_starts_a_rank_per_gpu():
    stages = dockerfile_stages(REPO / "docker" / "Dockerfile.train")
    assert {**stages["base-cuda"]["env"], **stages["final"]["env"]}.get("PET_NPROC_PER_NODE") == "gpu"


def test_compose_trains_the_tiny_demo_in_one_process():
    # The compose file's train service runs the tiny preset, whose batch is one rank's, on a GPU image too.
    import yaml

    train = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["train"]
    assert "tiny" in train["command"]
    assert train["environment"]["PET_NPROC_PER_NODE"] == "1"


@pytest.mark.parametrize(("variable", "value", "named"), [
    ("RETNET_OVERRIDE_GENERATION_CONFIG", "[1]",
     "override_generation_config (RETNET_OVERRIDE_GENERATION_CONFIG, --override-generation-config) must be a JSON "
     "object; got [1]"),
    ("RETNET_API_KEYS", '["", "k"]', "api_keys (RETNET_API_KEYS, --api-keys) must not hold a blank key"),
    ("RETNET_ENABLE_AUTO_TOOL_CHOICE", "true",
     "enable_auto_tool_choice (RETNET_ENABLE_AUTO_TOOL_CHOICE, --enable-auto-tool-choice) needs tool_call_parser"),
])
def test_a_setting_refused_from_its_variable_is_named_by_the_variable(monkeypatch, capsys, tmp_path, variable, value,
                                                                       named):
    # README, Serving: a refused value names the setting as it was given, `(RETNET_MAX_RUNNING, --max-running)`
    # when it came from the variable. The validators that write their own message named the flag alone.
    from retnet.serve.__main__ import parse_settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--model", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("retnet-serve: error: ") and err.count("\n") == 1
    assert named in err


def test_a_setting_refused_from_its_flag_is_still_named_by_the_flag(monkeypatch, capsys, tmp_path):
    from retnet.serve.__main__ import parse_settings

    monkeypatch.setenv("RETNET_MAX_LORAS", "2")
    with pytest.raises(SystemExit):
        parse_settings(["--model", str(tmp_path), "--max-cpu-loras", "1"])
    err = capsys.readouterr().err
    assert "max_cpu_loras (--max-cpu-loras) must be >= max_loras (RETNET_MAX_LORAS, --max-loras, 2)" in err
