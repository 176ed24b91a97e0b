"""What a benchmark's run measures and where its JSON goes: the rules the scripts share.

A ``--quick`` run writes only to a path given, never over a committed run the README quotes; a full run writes
the script's own file under ``benchmarks/results/`` (``train``'s, ``pooling``'s and ``serve``'s recorded figures
are a quick run's, written with ``--out`` as the README's headings show: a full run of those replaces them). ``--quick`` sizes a run down only where the user did not choose: an
option given explicitly keeps its value beside it (``BenchmarkParser``). Imported after the script has put the
repository root on ``sys.path`` (as ``_launch.py`` is).
"""

from __future__ import annotations

import argparse
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


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


class BenchmarkParser(argparse.ArgumentParser):
    """An ArgumentParser with ``--quick`` (``quick_help``: what it sizes down and what it writes). Options added
    with ``add_sized`` default to None, so that parsing can tell one given from one left out: those left out take
    their ``quick`` value under --quick and their ``full`` one otherwise, and one given keeps its value. (A preset
    that overwrote them after parsing once made ``--quick --train-steps 2`` train the quick run's 30 steps.)"""

    def __init__(self, *args, quick_help: str, quick_flag: str = "--quick", **kwargs):
        super().__init__(*args, **kwargs)
        self._sized: dict[str, tuple[object, object]] = {}
        self._quick_flag = quick_flag
        self._quick_dest = self.add_argument(
            quick_flag, action="store_true", help=f"{quick_help} (options given keep their values)").dest

    def add_sized(self, *flags: str, full, quick, help: str | None = None, **kwargs) -> argparse.Action:
        """An option whose default ``--quick`` changes, from ``full`` to ``quick``; its help says both."""
        sizes = f"default {_shown(full)}; {self._quick_flag} {_shown(quick)}"
        action = self.add_argument(*flags, default=None, help=f"{help} ({sizes})" if help else sizes, **kwargs)
        self._sized[action.dest] = (full, quick)
        return action

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        quick = getattr(namespace, self._quick_dest, False)
        for dest, (full, small) in self._sized.items():
            if getattr(namespace, dest, None) is None:
                value = small if quick else full
                setattr(namespace, dest, list(value) if isinstance(value, list) else value)
        return namespace, rest
