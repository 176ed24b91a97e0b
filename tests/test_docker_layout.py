"""docker/ read against the package it builds (no Docker engine here): what the Dockerfiles copy exists, the extras
they install and the commands they start are the project's, the images' torch is the one `make` installs from the
index of the image's base, the health check asks a real route, and the usage written in their comments works as
written."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile.serve", "Dockerfile.train"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n(?:\s*#.*\n)*", " ", (REPO / "docker" / name).read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def usage_commands(name: str) -> list[list[str]]:
    """The shell commands of the file's header comment (``#   docker ...``), continuation lines joined."""
    lines = [line[1:].strip() for line in (REPO / "docker" / name).read_text().splitlines()
             if line.startswith("#   ") or line.startswith("#       ")]
    commands, current = [], ""
    for line in lines:
        current += " " + line
        if current.endswith("\\"):
            current = current[:-1]
            continue
        commands.append(current.strip())
        current = ""
    return [shlex.split(command) for command in commands if command.startswith(("docker ", "mkdir "))]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_what_the_images_copy_exists(name):
    for instruction, args in instructions(name):
        if instruction == "COPY" and "--from" not in args:
            *sources, _ = args.split()
            missing = [source for source in sources if not (REPO / source).exists()]
            assert not missing, f"{name} copies {missing}, not in the repository"


def dockerignored(path: str) -> bool:
    """Whether the build leaves ``path`` (relative to the context, the repository root) out, by .dockerignore's
    rules as Docker reads them: the last pattern that matches the path or a folder above it decides (``!``: kept);
    ``*`` and ``?`` stay within one path element, ``**`` crosses them."""
    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        regex = "".join(wildcards.get(part, part if part.startswith("[") else re.escape(part))
                        for part in re.split(r"(\*\*/|\*\*|\*|\?|\[[^]]*\])", pattern))
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i + 1])) for i in range(len(parts))):
            excluded = not keep
    return excluded


def test_the_build_context_leaves_out_the_venv_runs_and_caches_and_keeps_what_the_images_copy():
    """Without a .dockerignore the legacy builder and podman sent the whole repository as the context (its .venv
    alone 3 GB, the runs, the caches, .git) at every build."""
    for path in (".venv/bin/python", ".git/HEAD", "runs/demo/export/model.safetensors", ".pytest_cache/README.md",
                 "retnet/__pycache__/__init__.cpython-311.pyc", "retnet_stack.egg-info/PKG-INFO"):
        assert dockerignored(path), path
    for name in DOCKERFILES:
        for instruction, args in instructions(name):
            if instruction == "COPY" and "--from" not in args:
                *sources, _ = args.split()
                files = [path for source in sources for path in [REPO / source, *(REPO / source).rglob("*")]
                         if path.is_file() and "__pycache__" not in path.parts]
                left_out = [str(path.relative_to(REPO)) for path in files if dockerignored(str(path.relative_to(REPO)))]
                assert files and not left_out, f"{name} copies {left_out[:5]}, which .dockerignore leaves out"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_extras_the_images_install_are_the_projects(name):
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    installed = [extra for instruction, args in instructions(name) if instruction == "RUN"
                 for group in re.findall(r"pip install \"\.\[([\w,]+)\]\"", args) for extra in group.split(",")]
    assert installed, f"{name} installs the project with no extra"
    assert set(installed) <= extras, set(installed) - extras


@pytest.mark.parametrize(("name", "packages"), [("Dockerfile.serve", ["serve", "model"]),
                                               ("Dockerfile.train", ["train"])])
def test_each_image_installs_every_extra_its_commands_name_as_needed(name, packages):
    # `retnet-serve --quantization int8` asks for [quant], and the serving image installed [serve] alone: the flag
    # was refused there, naming an extra that the image's user could not install into it
    # (retnet/train/evaluate*.py: retnet-eval's, a command neither image starts)
    named = {extra for package in packages for path in sorted((REPO / "retnet" / package).glob("*.py"))
             if not path.name.startswith("evaluate")
             for extra in re.findall(r"retnet-stack\[(\w+)\]", path.read_text(encoding="utf-8"))}
    installs = [set(group.split(",")) for instruction, args in instructions(name) if instruction == "RUN"
                for group in re.findall(r"pip install \"\.\[([\w,]+)\]\"", args)]
    assert named and installs, (named, installs)
    for extras in installs:  # (the training image's two, one per base)
        assert named <= extras, f"{name} installs [{','.join(sorted(extras))}], not {sorted(named - extras)}"


def test_the_images_start_the_projects_commands():
    scripts = PYPROJECT["project"]["scripts"]
    serve = dict(instructions("Dockerfile.serve"))
    assert json.loads(serve["ENTRYPOINT"]) == ["retnet-serve"] and "retnet-serve" in scripts
    train = json.loads(dict(instructions("Dockerfile.train"))["ENTRYPOINT"])
    module = train[train.index("-m") + 1]
    assert (REPO / Path(*module.split(".")) / "__main__.py").exists(), module


def test_the_images_torch_is_makes_from_the_index_of_their_base():
    make_version = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    for name in DOCKERFILES:
        text = (REPO / "docker" / name).read_text()
        assert re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)[1] == make_version, name
        cpu = re.search(r"^FROM python:\S+ AS base-cpu\n(.*?)^FROM ", text, re.M | re.S)[1]
        assert "ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu\n" in cpu, name
        # the CUDA build of torch for the CUDA release of the base image (12.6.3: cu126)
        cuda = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+ AS base-cuda\n(.*?)^FROM ", text, re.M | re.S)
        assert f"ENV TORCH_INDEX=https://download.pytorch.org/whl/cu{cuda[1]}{cuda[2]}\n" in cuda[3], name


def test_the_serving_image_checks_a_real_health_route_on_the_port_it_serves():
    serve = dict(instructions("Dockerfile.serve"))
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\S*?)'", serve["HEALTHCHECK"])
    assert url, serve["HEALTHCHECK"]
    port, route = url.groups()
    assert f'@app.get("{route}")' in (REPO / "retnet" / "serve" / "app.py").read_text()
    cmd = json.loads(serve["CMD"])
    assert cmd[cmd.index("--port") + 1] == port == serve["EXPOSE"]


@pytest.mark.parametrize("service", ["serve", "train"])
def test_compose_builds_its_images_from_the_dockerfiles(service):
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    build = compose["services"][service]["build"]
    assert ((REPO / "docker" / build["context"]) / build["dockerfile"]).resolve() == \
        REPO / "docker" / f"Dockerfile.{service}"


def test_compose_serves_with_real_settings(monkeypatch, tmp_path):
    from retnet.serve.__main__ import parse_settings

    serve = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["serve"]
    for variable, value in serve["environment"].items():
        monkeypatch.setenv(variable, value)
    command = serve["command"]
    command[command.index("--model") + 1] = str(tmp_path)
    settings = parse_settings(command)
    assert settings.max_running == int(serve["environment"]["RETNET_MAX_RUNNING"])
    assert settings.max_queue == int(serve["environment"]["RETNET_MAX_QUEUE"])
    assert serve["ports"] == [f"127.0.0.1:{settings.port}:{settings.port}"]


def test_a_training_run_on_a_host_directory_writes_it_as_the_host_user():
    # The image runs as its own uid 10001, which on Linux cannot write a directory of the user's bind-mounted
    # at /runs (nor the root-owned one docker creates for a missing path): the written usage stopped at once,
    # "train.output_dir '/runs/demo' cannot be created: Permission denied".
    runs = [command for command in usage_commands("Dockerfile.train") if command[:2] == ["docker", "run"]]
    assert runs
    for command in runs:
        mounts = [command[i + 1] for i, word in enumerate(command) if word in ("-v", "--volume")]
        assert any(mount.startswith("$PWD/") and not mount.endswith(":ro") for mount in mounts), command
        assert "--user" in command, shlex.join(command)
        assert "HOME=/tmp" in command, shlex.join(command)  # (the host uid has no home in the image)
    assert ["mkdir", "-p", "runs"] in usage_commands("Dockerfile.train")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_image_the_usage_runs_it_builds(name):
    # (the training usage ran retnet-train:cuda, an image none of its commands built: docker looked for it on a hub)
    commands = usage_commands(name)
    built = {command[command.index("-t") + 1] for command in commands if command[:2] == ["docker", "build"]}
    for command in commands:
        if command[:2] == ["docker", "run"]:
            image = run_image(command)
            assert image in built, f"{name}: `docker run ... {image}` but the usage builds only {sorted(built)}"


def run_image(command: list[str]) -> str:
    """The image a ``docker run`` command starts: its first word after the flags and their values."""
    words, at = command[2:], 0
    while words[at].startswith("-"):
        at += 2 if words[at] in ("--user", "-e", "-v", "--volume", "-p", "--gpus") else 1
    return words[at]
