"""The distribution as users install it: each extra declares what its commands import, the sdist carries the
test suite, and a wheel built from that sdist (pip's way for an sdist install) holds the package data."""

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]

# Imported directly, but installed as a declared package's own dependency (and versioned by it).
TRANSITIVE = {"starlette": "fastapi", "pydantic-core": "pydantic", "huggingface-hub": "transformers",
              "pyyaml": "transformers", "pandas": "datasets", "pyarrow": "datasets"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(requirements: list[str]) -> set[str]:
    return {_norm(re.match(r"[A-Za-z0-9_.\-]+", req).group(0)) for req in requirements}


def _imported_distributions(files) -> dict[str, set[str]]:
    """Distribution -> the files importing it, for every third-party import (top level or inside a function)."""
    providers = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "retnet":
                    continue
                for dist in providers.get(top, [top]):
                    found.setdefault(_norm(dist), set()).add(str(path.relative_to(REPO)))
    return found


def _undeclared(files, declared: set[str]) -> dict[str, list[str]]:
    return {dist: sorted(users) for dist, users in _imported_distributions(files).items()
            if dist not in declared and TRANSITIVE.get(dist) not in declared}


def test_serve_extra_declares_what_the_server_commands_import():
    # retnet-run-batch and `python -m retnet.serve.demo` import httpx; it was only in [dev], so
    # `pip install 'retnet-stack[serve]'` left both failing with ModuleNotFoundError.
    declared = _names(PROJECT["dependencies"]) | _names(PROJECT["optional-dependencies"]["serve"])
    assert _undeclared(sorted((REPO / "retnet" / "serve").glob("*.py")), declared) == {}


def test_every_import_of_the_package_is_declared_by_some_extra():
    declared = _names(PROJECT["dependencies"])
    for extra, requirements in PROJECT["optional-dependencies"].items():
        if extra != "dev":  # the test tools; nothing under retnet/ may need them
            declared |= _names(requirements)
    assert _undeclared(sorted((REPO / "retnet").rglob("*.py")), declared) == {}


def test_torch_floor_has_the_torch_apis_the_model_imports():
    # torch.distributed.tensor became DTensor's public module in 2.5 (2.4's holds only tensor/parallel):
    # with torch>=2.4 declared, `import retnet` failed on 2.4 with an ImportError
    users = [str(path.relative_to(REPO)) for path in sorted((REPO / "retnet").rglob("*.py"))
             if re.search(r"^from torch\.distributed\.tensor import", path.read_text(encoding="utf-8"), re.M)]
    assert "retnet/model/modeling_retnet.py" in users
    torch_req = next(req for req in PROJECT["dependencies"] if _names([req]) == {"torch"})
    floor = tuple(int(part) for part in re.search(r">=\s*([\d.]+)", torch_req).group(1).split(".")[:2])
    assert floor >= (2, 5), torch_req


def test_readme_states_the_declared_torch_floor():
    # the README's opening line said torch >= 2.4 after the floor became 2.5 (on 2.4 `import retnet` fails)
    torch_req = next(req for req in PROJECT["dependencies"] if _names([req]) == {"torch"})
    floor = re.search(r">=\s*([\d.]+)", torch_req).group(1)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    stated = re.findall(r"\bon torch ≥ ([\d.]+)", readme) + re.findall(r"only asks for `torch>=([\d.]+)`", readme)
    assert len(stated) == 2 and set(stated) == {floor}, (stated, torch_req)


def _build(kind: str, source: Path, out: Path) -> Path:
    # setuptools from this environment (no isolated build env: no index needed); a child process, since
    # setuptools' build changes the working directory and its logging
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_sdist_carries_the_suite_and_its_wheel_the_package_data(tmp_path):
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "wheels")
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "Makefile", ".hadolint.yaml",
                 ".dockerignore"):
        if (REPO / name).exists():  # (without MANIFEST.in the assertions below say what the sdist lacks)
            shutil.copy(REPO / name, source / name)
    for folder in ("retnet", "tests", "benchmarks", "docker"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)

    sdist = _build("sdist", source, tmp_path / "dist")
    with tarfile.open(sdist) as archive:
        # (the "data" filter: Python 3.10.12 and 3.11.4 on)
        archive.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        root = f"{archive.getnames()[0].split('/')[0]}/"
        members = {name.removeprefix(root) for name in archive.getnames()}
    # the suite as it runs: its conftest, every subfolder, and the files the tests read beside it
    wanted = {str(path.relative_to(source)) for folder in ("tests", "retnet")
              for path in (source / folder).rglob("*") if path.is_file()}
    wanted |= {"README.md", "LICENSE", "Makefile", ".hadolint.yaml", ".dockerignore", "docker/Dockerfile.serve",
               "docker/Dockerfile.train", "docker/compose.yaml", "benchmarks/decode.py"}
    assert sorted(wanted - members) == []

    wheel = _build("wheel", tmp_path / "unpacked" / root, tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    data = {str(path.relative_to(source)) for path in (source / "retnet").rglob("*")
            if path.is_file() and path.suffix != ".py"}
    assert data and sorted(data - names) == []  # the presets retnet-train reads with importlib.resources
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    for script, target in PROJECT["scripts"].items():
        assert f"{script} = {target}" in entry_points
