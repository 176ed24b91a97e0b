"""A library's warning (``warnings.warn``) or last-resort log record printed while a command's tqdm bar is open
goes above the bar, on a line of its own, as the commands' own log lines do (``retnet.extras.warnings_above_bars``).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

from retnet.extras import warnings_above_bars

REPO = Path(__file__).resolve().parents[1]

# A fresh interpreter: pytest records warnings and gives the root logger handlers, which would hide both paths.
# (As a command: `import retnet` then leaves torch and transformers unimported.)
_MID_BAR = """
import logging, sys, warnings
sys.argv = ["retnet-train"]
from tqdm.auto import tqdm
from retnet.extras import warnings_above_bars
with warnings_above_bars():
    with tqdm(total=4, desc="train", file=sys.stderr, mininterval=0) as bar:
        bar.update(1)
        warnings.warn("a library's warning")
        logging.getLogger("some.library").warning("a library's record")
        bar.update(1)
    warnings.warn("a warning after the bar")
"""


def test_a_warning_and_a_last_resort_record_go_above_an_open_bar():
    done = subprocess.run([sys.executable, "-c", _MID_BAR], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pieces = [piece for piece in re.split(r"[\r\n]", done.stderr) if piece.strip()]
    assert any(piece.startswith("train:") for piece in pieces)  # the bar was drawn
    # each on a piece of its own, not after a frame of the bar (`| 1/4 [00:00<...]<string>:9: UserWarning: ...`)
    assert "<string>:9: UserWarning: a library's warning" in pieces, pieces
    assert "a library's record" in pieces, pieces
    assert "<string>:12: UserWarning: a warning after the bar" in pieces, pieces


def test_blocks_nest_and_the_last_restores_what_the_first_found():
    showwarning, last_resort = warnings.showwarning, logging.lastResort
    opened, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        with warnings_above_bars():
            opened.set()
            release.wait(10)

    thread = threading.Thread(target=other_thread)
    with warnings_above_bars():
        thread.start()
        assert opened.wait(10)
        with warnings_above_bars():
            assert warnings.showwarning is not showwarning and logging.lastResort is not last_resort
    # the first block ended before the other thread's: still in place for that one
    assert warnings.showwarning is not showwarning and logging.lastResort is not last_resort
    release.set()
    thread.join(10)
    assert warnings.showwarning is showwarning and logging.lastResort is last_resort


def test_recorded_warnings_stay_recorded_with_a_bar_open():
    # catch_warnings(record=True) (pytest.warns, a program's own) leaves showwarning as warnings' own and records
    # through another hook: the warning was printed above the bar and never recorded ("DID NOT WARN")
    from tqdm.auto import tqdm

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with warnings_above_bars(), tqdm(total=2, disable=False, file=sys.stderr) as bar:
            bar.update(1)
            warnings.warn("recorded, not printed", stacklevel=1)
    assert [str(w.message) for w in caught] == ["recorded, not printed"]
