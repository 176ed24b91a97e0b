"""The README's command-line options exist in the code: an option renamed in code but not in the README sends
its readers to an error.

Checked, every name taken from the code rather than listed here:

- training settings: each ``--section.key`` override (anywhere in the README), each ``section.key`` written in
  backticks as a setting's name, and each table and key of a ```` ```toml ```` block must be a field of that
  section of ``retnet.train.config.JobConfig`` (keys under a table field: see ``_TABLE_KEYS``);
- flags: each flag on a command line of one of this package's programs (``retnet-serve ...``, ``python -m
  retnet.serve ...``, ``torchrun ... -m retnet.train ...``; the programs are ``[project.scripts]`` and the
  ``retnet`` modules run with ``python -m``) must be one that program's argument parser knows; so must a flag
  written alone (`` `--max-running 64` ``), taken as the flag of the program last named before it in its
  paragraph, else the program its headings name (``## Serving (`retnet.serve`)``).

Flags of other programs (``torchrun``, ``curl``, ``python benchmarks/*.py``, ``retnet-lm-eval``: lm-eval's own
command line) are not checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import importlib
import re
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport (same API)
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# retnet-lm-eval hands its arguments, unchanged, to lm-evaluation-harness's own command line: its flags are
# lm-eval's (documented by lm-eval), and its parser is only reachable by importing lm_eval.
_THIRD_PARTY_CLI = {"retnet.harness"}

_LAUNCHERS = {"torchrun", "accelerate", "deepspeed"}  # run `-m MODULE`; the flags before it are theirs
_SEPARATORS = {"|", "||", "&&", ";", "&"}
# A placeholder in a documented name: model.extra.KEY, data.mixture.<label>, optim.*, grpo.sapo_temperature_*.
_PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*|<[^>]+>|\.\.\.")
# `model.pt`, `train.py`: files named like a section, not settings.
_FILE_SUFFIXES = {"pt", "py", "json", "jsonl", "toml", "safetensors", "bin", "txt", "yaml"}


# ---------------------------------------------------------------------------------------------- the code's names


@functools.cache
def _sections() -> dict[str, dict[str, typing.Any]]:
    """``{"optim": {"lr": float, ...}, ...}``: every section of the training config and its fields' types."""
    from retnet.train.config import JobConfig

    return {name: typing.get_type_hints(cls) for name, cls in typing.get_type_hints(JobConfig).items()}


def _table_keys() -> dict[str, frozenset[str] | None]:
    """The keys a table-typed (dict) field takes, by ``section.field``; None: any key.

    An override may set one key of a table (``--model.extra.use_xpos=true``), so the README names keys under
    these fields. The config refuses unknown keys of ``model.extra`` (RetNetConfig's fields) and of
    ``grpo.generation_kwargs`` at load, so the README may only name those; ``data.mixture``'s keys are the
    user's own source labels (which may hold dots: ``--data.mixture.notes.jsonl=2``), so any name is one.
    """
    from retnet.model import RetNetConfig
    from retnet.train.config_tuning import GRPO_GENERATION_KWARGS

    return {
        "model.extra": frozenset(RetNetConfig().to_dict()),
        "grpo.generation_kwargs": frozenset(GRPO_GENERATION_KWARGS),
        "data.mixture": None,
    }


def _unknown_setting(dotted: str, sections: dict, table_keys: dict) -> str | None:
    """Why ``section.key[.subkey]`` names no setting, or None when it does (placeholders match anything)."""
    section, _, rest = dotted.partition(".")
    if section not in sections:
        return f"no config section [{section}] (sections: {', '.join(sections)})"
    key, _, subkey = rest.partition(".")
    fields = sections[section]
    if _PLACEHOLDER.fullmatch(key):
        return None
    matched = fnmatch.filter(fields, key)
    if not matched:
        return f"[{section}] has no field {key!r}"
    if not subkey:
        return None
    tables = [name for name in matched if typing.get_origin(fields[name]) is dict or fields[name] is dict]
    if not tables:
        return f"{section}.{key} is not a table, so it has no key {subkey!r}"
    for table in tables:
        known = table_keys[f"{section}.{table}"]
        if known is None or _PLACEHOLDER.fullmatch(subkey) or fnmatch.filter(known, subkey):
            return None
    return f"{section}.{key} takes no key {subkey!r}"


def test_every_table_field_has_its_keys_described():
    """A new dict-typed field must say here which keys the README may name under it."""
    tables = {f"{section}.{name}" for section, fields in _sections().items() for name, annotation in fields.items()
              if annotation is dict or typing.get_origin(annotation) is dict}
    assert tables == set(_table_keys())


def _entry_points() -> dict[str, str]:
    """``{"retnet-serve": "retnet.serve", ...}``: each console script and the module ``python -m`` runs alike."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    return {name: target.split(":")[0].removesuffix(".__main__") for name, target in scripts.items()}


class _ParserBuilt(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def _parser_of(module: str) -> argparse.ArgumentParser:
    """The argument parser ``python -m module`` parses its command line with, as its ``main`` builds it.

    ``main`` is stopped at its first parse, before it does anything, by a ``parse_known_args`` (which
    ``parse_args`` calls) that hands the parser back; so no parser-building function is named here, and one
    built inline in ``main`` is reached as well."""
    imported = importlib.import_module(module)
    main = getattr(imported, "main", None) or importlib.import_module(f"{module}.__main__").main

    def hand_back(self, *args, **kwargs):
        raise _ParserBuilt(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", hand_back)
        try:
            main([])
        except _ParserBuilt as built:
            return built.parser
    raise AssertionError(f"{module}.main() returned without parsing its arguments")


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


# ---------------------------------------------------------------------------------------------- the README's


@dataclasses.dataclass(frozen=True)
class _Mention:
    line: int  # 1-based, in README.md
    program: str  # a module for this package's programs, else "other:NAME"
    option: str  # "--max-running", "--optim.lr", or a setting's name "optim.lr"


def _mask_quotes(text: str) -> str:
    """Quoted text blanked (its quotes kept), so a `#`, `;` or `--` inside a value is not read as shell."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", lambda m: m[0][0] + " " * (len(m[0]) - 2) + m[0][-1], text)


def _words(text: str) -> Iterator[str]:
    """Shell words of one line, comments dropped and separators (``|``, ``&&``, ``;``, ``&``) apart."""
    text = re.sub(r"(^|\s)#.*", "", _mask_quotes(text))
    for word in text.split():
        for piece in re.split(r"(\|\||\||&&|;|&(?!\w))", word):
            if piece:
                yield piece


_OTHER_COMMANDS = {"curl", "make", "bash", "pip", "docker", "vllm", "lm_eval", "lm-eval"}


def _starts_command(word: str, entry_points: dict[str, str]) -> bool:
    name = word.rsplit("/", 1)[-1]
    return (name in entry_points or name in _LAUNCHERS or name in _OTHER_COMMANDS
            or re.fullmatch(r"python[0-9.]*", name) is not None)


class _Command:
    """Which program the words of a shell command are passed to, word by word."""

    def __init__(self, entry_points: dict[str, str]) -> None:
        self.entry_points = entry_points
        self.program: str | None = None  # None: at the start of a command
        self.launcher = False  # python or torchrun: `-m MODULE` names the program
        self.expect_module = False  # the word after -m

    def read(self, word: str) -> str | None:
        """The program ``word`` is an option of, when it is one (``--x``, ``-x``), else None."""
        if word in _SEPARATORS:
            self.program, self.launcher, self.expect_module = None, False, False
        elif self.expect_module:
            self.program = word if word.split(".")[0] == "retnet" else f"other:{word}"
            self.launcher = self.expect_module = False
        elif self.program is None:
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", word):  # FOO=bar before the command
                return None
            name = word.rsplit("/", 1)[-1]
            self.program = self.entry_points.get(name, f"other:{name}")
            # python -m MODULE, torchrun ... -m MODULE; python SCRIPT.py stays another program
            self.launcher = name in _LAUNCHERS or re.fullmatch(r"python[0-9.]*", name) is not None
        elif word == "-m" and self.launcher:
            self.expect_module = True
        elif re.match(r"--?[A-Za-z]", word):
            return self.program
        return None


def _flag_name(word: str) -> str:
    return word.split("=", 1)[0].rstrip(".,:;")


def _flag(number: int, program: str, word: str) -> _Mention:
    """A flag of ``program`` on README line ``number``; the training launcher's dotted ones are settings."""
    name = _flag_name(word)
    return _Mention(number, "setting" if program == "retnet.train" and "." in name else program, name)


def _command_mentions(number: int, words: list[str], command: _Command) -> Iterator[_Mention]:
    for word in words:
        program = command.read(word)
        if program is not None:
            yield _flag(number, program, word)


def _span_command(content: str, entry_points: dict[str, str]) -> tuple[list[str], _Command] | None:
    """The words of a code span that is a shell command (``retnet-serve --model DIR``), with the command that
    reads them; None for any other span."""
    words = list(_words(content))
    first = next((w for w in words if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", w)), "")
    return (words, _Command(entry_points)) if _starts_command(first, entry_points) else None


def _headed_program(heading: str, entry_points: dict[str, str]) -> str | None:
    """The program a heading names: ``### Length extrapolation (`retnet-eval --position-edges`)``, or the module
    of ``## Serving (`retnet.serve`)`` when a script runs it."""
    for span in re.findall(r"`([^`]+)`", heading):
        if span in entry_points.values():
            return span
        started = _span_command(span, entry_points)
        if started is not None:
            words, command = started
            for word in words:
                command.read(word)
            return command.program
    return None


def _mentions(text: str) -> Iterator[_Mention]:
    entry_points = _entry_points()
    headed: dict[int, str | None] = {}  # heading level -> the program it names
    fence: str | None = None  # the language of the fenced block we are in
    command: _Command | None = None  # a shell command continued over lines ending in "\"
    paragraph: list[tuple[int, str]] = []

    def prose() -> Iterator[_Mention]:
        program = next((headed[level] for level in sorted(headed, reverse=True) if headed[level]), None)
        yield from _prose(paragraph, program, entry_points)
        paragraph.clear()

    for number, line in enumerate(text.splitlines(), 1):
        yield from _dotted_overrides(number, line)
        if line.startswith("```"):
            yield from prose()
            fence = line[3:].strip() if fence is None else None
        elif fence in ("bash", "sh", "shell", "console"):
            command = command or _Command(entry_points)
            yield from _command_mentions(number, list(_words(line)), command)
            if not line.rstrip().endswith("\\"):
                command = None
        elif fence is None:
            heading = re.match(r"(#+) ", line)
            if heading or not line.strip():
                yield from prose()
            else:
                paragraph.append((number, line))
            if heading:
                level = len(heading[1])
                headed = {k: v for k, v in headed.items() if k < level}
                headed[level] = _headed_program(line, entry_points)
    yield from prose()


def _dotted_overrides(number: int, line: str) -> Iterator[_Mention]:
    """Every ``--section.key`` of the line whose section is a real one (``--section.key=value`` describes the
    form; a training command line's dotted flags are checked whatever their section)."""
    sections = _sections()
    for match in re.finditer(r"(?<![\w-])--([a-z_]+)\.([A-Za-z0-9_.*<>-]+)", line):
        if match[1] in sections:
            yield _Mention(number, "setting", _flag_name(match[0]))


def _prose(paragraph: list[tuple[int, str]], program: str | None,
           entry_points: dict[str, str]) -> Iterator[_Mention]:
    """The code spans of a paragraph (which may wrap over lines): commands, flags alone and setting names.
    ``program`` is the one the headings name; a command in the paragraph names it for the flags after it."""
    text, starts = "", []
    for number, line in paragraph:
        starts.append((len(text), number))
        text += line + " "
    sections = _sections()
    for span in re.finditer(r"`([^`]+)`", text):
        content = span[1].strip()
        number = max((start, n) for start, n in starts if start <= span.start())[1]
        started = _span_command(content, entry_points)
        if started is not None:
            words, command = started
            yield from _command_mentions(number, words, command)
            program = command.program
        elif content.startswith("-"):
            for word in _words(content):
                # dotted ones are training overrides whatever the paragraph is about: _dotted_overrides has them
                if re.match(r"--?[A-Za-z]", word) and "." not in _flag_name(word) and program is not None:
                    yield _Mention(number, program, _flag_name(word))
        else:
            setting = re.match(r"([a-z_]+)\.([A-Za-z0-9_.*<>]+)(.?)", content)
            if setting is None or setting[1] not in sections:
                continue
            if setting[3] == "(" or setting[2] in _FILE_SUFFIXES:
                continue  # a call, `model.load_state_dict(full)`; a file, `model.pt`
            if text[span.end():].lstrip().startswith("→"):
                continue  # `train.warmup_steps` → `optim.warmup_steps`: a misplaced key, then the field meant
            yield _Mention(number, "setting", f"{setting[1]}.{setting[2]}".rstrip("."))


def _toml_mentions(text: str) -> Iterator[_Mention]:
    """The tables and keys of the README's TOML blocks, as ``section.key`` names."""
    for block in re.finditer(r"^```toml\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        number = text.count("\n", 0, block.start()) + 2
        for section, table in tomllib.loads(block[1]).items():
            if not isinstance(table, dict):
                yield _Mention(number, "setting", section)
                continue
            for key, value in table.items():
                yield _Mention(number, "setting", f"{section}.{key}")
                if isinstance(value, dict) and key != "mixture":  # data.mixture's keys are labels: any name
                    yield from (_Mention(number, "setting", f"{section}.{key}.{sub}") for sub in value)


# ---------------------------------------------------------------------------------------------- the test


def test_readme_options_exist():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    sections, table_keys = _sections(), _table_keys()
    parsers: dict[str, set[str]] = {}
    unknown = []
    for mention in sorted(set(_mentions(text)) | set(_toml_mentions(text)), key=lambda m: (m.line, m.option)):
        program, option = mention.program, mention.option
        if program == "setting":
            why = _unknown_setting(option.removeprefix("--"), sections, table_keys)
        elif program.startswith("other:") or program in _THIRD_PARTY_CLI:
            continue
        else:
            if program not in parsers:
                parsers[program] = _options(_parser_of(program))
            known = parsers[program]
            # `--prefix-cache-*` names a family of flags: at least one must exist
            why = None if fnmatch.filter(known, option) else f"not an option of python -m {program}"
        if why is not None:
            unknown.append(f"README.md:{mention.line}: {option}: {why}\n    {lines[mention.line - 1].strip()}")
    assert not unknown, f"{len(unknown)} README option(s) the code does not know:\n" + "\n".join(unknown)
