"""The optional extras (pyproject.toml's ``[project.optional-dependencies]``) the commands need, and the refusal of
one run where its extra is not installed: a line naming the extra to install, not an import's traceback. Also
every command's end on a Ctrl-C it does not handle itself (:func:`exits_on_ctrl_c`), which wraps the same ``main``.

Lazily imported by each command's ``main``, whose module itself imports none of its extra's packages at the top:
an import failed there before ``main`` could answer, ``--help`` included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

# Each extra's top-level modules that retnet imports, by their import names (pydantic_settings for
# pydantic-settings); tests/test_extras_missing.py holds them to pyproject.toml's lists.
EXTRA_MODULES: dict[str, frozenset[str]] = {
    "train": frozenset({"datasets", "tqdm", "matplotlib", "tensorboard", "peft"}),
    "serve": frozenset({"fastapi", "uvicorn", "pydantic", "pydantic_settings", "prometheus_client", "llguidance",
                        "tqdm", "httpx", "jinja2"}),
}
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def missing_extra(error: ModuleNotFoundError, extra: str) -> str | None:
    """The refusal's words when the module ``error`` could not import comes with ``extra``; None for any other (a
    missing submodule of an installed package is a version mismatch, whose traceback says more), and None after a
    Ctrl-C a library swallowed (:func:`exits_on_ctrl_c`: the module is half-imported, not missing)."""
    if error.name not in EXTRA_MODULES[extra] or _interrupted():
        return None
    return f"{error.name} is not installed; it comes with the [{extra}] extra: pip install 'retnet-stack[{extra}]'"


@contextlib.contextmanager
def needs_extra(prog: str, extra: str) -> Iterator[None]:
    """Run the block; a module of ``extra`` that is not installed ends the command with one line on stderr and
    status 2 (every command's status for a usage error). Other import errors pass through."""
    try:
        yield
    except ModuleNotFoundError as error:
        message = missing_extra(error, extra)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


# What a command writing lines says when their reader went away (`... | head -1`), ending with status 1.
BROKEN_PIPE = "the output was closed by its reader (broken pipe); the lines after it were not written"


def to_devnull(stream) -> None:
    """``stream``'s file descriptor pointed at /dev/null, so that Python's own flush at exit does not fail again on
    the text left in its buffer (a closed pipe's)."""
    with contextlib.suppress(OSError, ValueError):  # (a stream without a descriptor: a test's StringIO)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


_sigint_lock = threading.Lock()
_sigint_depth = 0  # blocks open now in the main thread (retnet-eval's script nests main's in its own)
_sigint_received = False


def _record_sigint(signum, frame) -> None:
    global _sigint_received
    _sigint_received = True
    raise KeyboardInterrupt


def _interrupted() -> bool:
    """A SIGINT reached the handler of an open :func:`exits_on_ctrl_c` block."""
    return _sigint_received and _sigint_depth > 0


@contextlib.contextmanager
def exits_on_ctrl_c(prog: str) -> Iterator[None]:
    """Run the block; a Ctrl-C it does not handle itself ends the command with one line and status 130, as one
    the command handles does. The imports of torch and transformers and a tokenizer's load take seconds, and a
    Ctrl-C in them was a traceback of wherever the import was.

    Any exception that follows a SIGINT received in the block ends it so too, not only a KeyboardInterrupt: a
    library's import that swallows the interrupt leaves a module half-imported, and what failed next was the
    traceback (numpy's RecursionError as transformers' "Could not import module 'GenerationMixin'"). The signal
    is recorded by a handler of this block's, installed only over Python's own (a handler of the program's, or
    SIGINT ignored as in a background job, is left as it is) and only in the main thread, where signals run.
    Without a SIGINT an error passes through as it is."""
    global _sigint_depth, _sigint_received

    installed = False
    if threading.current_thread() is threading.main_thread():
        with _sigint_lock:
            current = signal.getsignal(signal.SIGINT)
            if current is _record_sigint:
                _sigint_depth += 1
                installed = True
            elif current is signal.default_int_handler:
                _sigint_received, _sigint_depth = False, 1
                signal.signal(signal.SIGINT, _record_sigint)
                installed = True
    try:
        yield
    except SystemExit:  # (a status the command chose, a Ctrl-C it handled itself included)
        raise
    except BaseException as error:
        if not (isinstance(error, KeyboardInterrupt) or (installed and _sigint_received)):
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        if installed:
            with _sigint_lock:
                _sigint_depth -= 1
                # (a handler the block's code installed and left is its own to restore)
                if _sigint_depth == 0 and signal.getsignal(signal.SIGINT) is _record_sigint:
                    signal.signal(signal.SIGINT, signal.default_int_handler)  # (the only one it replaces)


def retnet_eval(argv: list[str] | None = None) -> int:
    """retnet-eval's console script: :func:`retnet.train.evaluate.main` once its module is imported, which imports
    torch at its top (seconds). As that module's ``main`` the script imported it before ``main`` ran: a Ctrl-C in
    the import was a traceback, where every other command's is one line and status 130."""
    # (main's own block nests in this one: a Ctrl-C the import swallowed still counts for an error main meets)
    with exits_on_ctrl_c("retnet-eval"):
        from retnet.train.evaluate import main

        return main(argv)


_bars_lock = threading.Lock()
_bars_hidden_depth = 0  # blocks open now (several threads' loads: the engine's, a draft's, a pooling engine's)
_bars_shown_before = False  # the setting as the first of them found it, which the last restores


@contextlib.contextmanager
def transformers_bars_hidden() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards": noise for a model of a few MB,
    drawn among the command's lines) hidden for the block, then as they were: a program that imports retnet keeps
    its own setting. Also huggingface_hub's, which transformers switches with them: a block holds no download.
    Blocks of several threads nest: the last to end restores what the first found (each restoring what it found,
    one opened while another was open read "hidden" and left the bars off for good)."""
    global _bars_hidden_depth, _bars_shown_before
    from transformers.utils import logging as transformers_logging

    with _bars_lock:
        if _bars_hidden_depth == 0:
            _bars_shown_before = transformers_logging.is_progress_bar_enabled()
            transformers_logging.disable_progress_bar()
        _bars_hidden_depth += 1
    try:
        yield
    finally:
        with _bars_lock:
            _bars_hidden_depth -= 1
            if _bars_hidden_depth == 0 and _bars_shown_before:
                transformers_logging.enable_progress_bar()


_above_lock = threading.Lock()
_above_depth = 0  # blocks open now (the command's, the trainer's around its bar: they nest)
_showwarning_before = None  # warnings.showwarning and logging.lastResort as the first block found them
_last_resort_before: logging.Handler | None = None
# warnings' own (writes to stderr): a program's replacement is left to show its warnings its way
_DEFAULT_SHOWWARNING = getattr(warnings, "_showwarning_orig", warnings.showwarning)


def bar_open() -> bool:
    """A tqdm bar is drawn now (without tqdm imported none is)."""
    module = sys.modules.get("tqdm")
    return module is not None and bool(getattr(module.tqdm, "_instances", None))


def _write_above_bars(text: str) -> None:
    # tqdm.write takes the bars off the terminal, writes the line and draws them again
    sys.modules["tqdm"].tqdm.write(text.rstrip("\n"), file=sys.stderr)


def emit_above_bars(handler: logging.Handler, record: logging.LogRecord) -> None:
    """``handler``'s record written above the open bars (:func:`bar_open`), as a handler's emit fails."""
    try:
        _write_above_bars(handler.format(record))
    except RecursionError:
        raise
    except Exception:
        handler.handleError(record)


def _showwarning_above_bars(message, category, filename, lineno, file=None, line=None) -> None:
    before = _showwarning_before or _DEFAULT_SHOWWARNING
    # As before: a warning to a file of its own, none open, a program's own showwarning (logging.captureWarnings'),
    # warnings being recorded
    # (catch_warnings(record=True), pytest.warns and pytest's own capture: warnings' showwarning, and its
    # _showwarnmsg_impl a list's append)
    recording = isinstance(getattr(getattr(warnings, "_showwarnmsg_impl", None), "__self__", None), list)
    if file is not None or not bar_open() or before is not _DEFAULT_SHOWWARNING or recording:
        before(message, category, filename, lineno, file, line)
        return
    _write_above_bars(warnings.formatwarning(message, category, filename, lineno, line))


class _LastResortAboveBars(logging.Handler):
    """logging's last resort (a library's record where no handler is configured: matplotlib's, peft's ...)."""

    def __init__(self, before: logging.Handler) -> None:
        super().__init__(before.level)
        self.before = before

    def handle(self, record: logging.LogRecord) -> bool:
        if not bar_open():
            return self.before.handle(record)
        return super().handle(record)

    def emit(self, record: logging.LogRecord) -> None:
        emit_above_bars(self, record)


@contextlib.contextmanager
def warnings_above_bars() -> Iterator[None]:
    """Python warnings (``warnings.warn``: torch's, transformers' ...) and logging's last-resort records printed
    above an open tqdm bar for the block, as the commands' own log lines are (tqdm.write): written as they were,
    one went on the bar's line, and the bar's next frame over it. With no bar open they are shown as before. Blocks
    of several threads nest: the last to end restores what the first found, where no one replaced it since."""
    global _above_depth, _showwarning_before, _last_resort_before

    with _above_lock:
        if _above_depth == 0:
            _showwarning_before = warnings.showwarning
            warnings.showwarning = _showwarning_above_bars
            _last_resort_before = logging.lastResort
            if _last_resort_before is not None:
                logging.lastResort = _LastResortAboveBars(_last_resort_before)
        _above_depth += 1
    try:
        yield
    finally:
        with _above_lock:
            _above_depth -= 1
            if _above_depth == 0:
                if warnings.showwarning is _showwarning_above_bars:
                    warnings.showwarning = _showwarning_before
                if isinstance(logging.lastResort, _LastResortAboveBars):
                    logging.lastResort = _last_resort_before
                _showwarning_before = _last_resort_before = None
