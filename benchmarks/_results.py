"""Where a benchmark's JSON goes: the rule the scripts whose recorded file is a full run share.

A ``--quick`` run's figures are not the recorded ones, so it must not overwrite the committed full run the README
quotes: it writes only to a path given. Imported after the script has put the repository root on ``sys.path``
(as ``_launch.py`` is).
"""

from __future__ import annotations

from pathlib import Path


def output_help(default: str) -> str:
    """The help of a script's output flag, ``default`` the recorded file under ``benchmarks/results/``."""
    return f"where the JSON goes (default benchmarks/results/{default}; with --quick nothing is written unless given)"


def results_path(given: Path | None, quick: bool, default: Path, *, flag: str = "--output",
                 note: str = "") -> Path | None:
    """The path given, else ``default`` unless ``quick``; None (having said so, ``note`` after) when nothing is
    to be written. ``flag``: the script's own name for its output option."""
    if given is not None:
        return given
    if quick:
        print(f"--quick: nothing written (give {flag} to keep it){note}")
        return None
    return default
