"""The suite's seconds per test file, for the order ``make test`` hands files to its xdist workers.

``--dist loadfile`` gives each worker whole files from one queue. xdist queues the files with the most tests first,
which puts the torchrun files (a few tests of a minute each) last: one worker then runs them alone while the other
has finished. tests/conftest.py orders the files by the seconds :data:`TABLE` holds instead, longest first (the
longest-processing-time rule), so the long files overlap and the short ones fill in at the end. The table is
measured, not guessed: ``make test-durations`` runs the suite with a JUnit report and this module's ``main`` sums it
per file. A file the table does not know yet is queued at :data:`UNKNOWN_PER_TEST` seconds a test.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path

TABLE = Path(__file__).with_name("file_durations.json")
UNKNOWN_PER_TEST = 0.5  # about the suite's median file's seconds per test


def load() -> dict[str, float]:
    """{path relative to the repository ("tests/train/test_grpo.py"): seconds}; empty when there is no table."""
    try:
        return {str(k): float(v) for k, v in json.loads(TABLE.read_text()).items()}
    except (OSError, ValueError):
        return {}


def file_seconds(junit_xml: Path) -> dict[str, float]:
    """Seconds per test file in a pytest JUnit report (each test case's setup, call and teardown)."""
    seconds: dict[str, float] = defaultdict(float)
    for case in ElementTree.parse(junit_xml).getroot().iter("testcase"):
        # classname "tests.train.test_grpo" (or "tests.train.test_grpo.TestClass"): the module's dotted path
        parts = case.get("classname", "").split(".")
        while parts and not parts[-1].startswith("test_"):
            parts.pop()
        if parts:
            seconds["/".join(parts) + ".py"] += float(case.get("time", 0.0))
    return dict(seconds)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.file_durations JUNIT_XML", file=sys.stderr)
        return 2
    seconds = file_seconds(Path(argv[0]))
    TABLE.write_text(json.dumps({k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
                                indent=1) + "\n")
    print(f"{TABLE}: {len(seconds)} files, {sum(seconds.values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
