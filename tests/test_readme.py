"""The README's command-line options exist in the code: an option renamed in code but not in the README sends
its readers to an error.

What is valid is read from the code, not listed here:

- training settings: each ``--section.key`` override (anywhere in the README), each ``section.key`` written in
  backticks as a setting's name and each table and key of a TOML block must be a field of that section of
  ``retnet.train.config.JobConfig`` (a key under a table field: see ``_table_keys``);
- flags: each flag on a command line of one of this package's programs (``[project.scripts]`` and the
  ``retnet`` modules run by ``python -m`` or ``torchrun -m``) must be one its argument parser knows, and so must a
  flag written alone (`` `--max-running 64` ``): see ``_Reader`` for whose flag that is.

Flags of other programs (``torchrun``'s, ``curl``'s, ``python benchmarks/*.py``'s, ``retnet-lm-eval``'s) are
not checked.
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

# retnet-lm-eval hands its arguments, unchanged, to lm-evaluation-harness's command line: its flags are lm-eval's
# (documented there), and its parser is only reachable by importing lm_eval.
_THIRD_PARTY_CLI = {"retnet.harness"}
_LAUNCHERS = {"torchrun", "accelerate", "deepspeed"}  # run `-m MODULE`; the flags before it are theirs
# Words that start another program's command line in a code span. Not make: its targets take no flags, and
# "`python -m retnet.kernels.aot` (or `make aot`)" names the flags' program first.
_OTHER_COMMANDS = {"curl", "bash", "pip", "docker", "vllm", "lm_eval", "lm-eval"}
_SEPARATORS = {"|", "||", "&&", ";", "&"}
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")  # FOO=bar before a command
_FLAG = re.compile(r"--[A-Za-z][\w*-]*(=.*)?|-[A-Za-z]")
# A placeholder in a documented name: model.extra.KEY, data.mixture.<label>; `*` globs: optim.muon_*.
_PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*|<[^>]+>|\.\.\.")
# `model.pt`, `train.py`: files, not settings.
_FILE_SUFFIXES = {"pt", "py", "json", "jsonl", "toml", "safetensors", "bin", "txt", "yaml"}
# The README's examples of other launchers' spellings, which retnet-train refuses naming the field meant: flags
# of no parser, on purpose (test_refused_spellings_are_refused_with_a_suggestion checks each is refused so).
_REFUSED_SPELLINGS = {"--steps", "--learning_rate", "--max_steps", "--per_device_train_batch_size"}


# ---------------------------------------------------------------------------------------------- the code's names


@functools.cache
def _sections() -> dict[str, dict[str, typing.Any]]:
    """``{"optim": {"lr": float, ...}, ...}``: every section of the training config and its fields' types."""
    from retnet.train.config import JobConfig

    return {name: typing.get_type_hints(cls) for name, cls in typing.get_type_hints(JobConfig).items()}


def _is_table(annotation: typing.Any) -> bool:
    return annotation is dict or typing.get_origin(annotation) is dict


@functools.cache
def _table_keys() -> dict[str, frozenset[str] | None]:
    """The keys a table (dict) field takes, by ``section.field``; None: any key.

    An override may set one key of a table (``--model.extra.use_xpos=true``), so the README names keys under
    these fields. The config refuses at load the keys of ``model.extra`` that are no RetNetConfig field and the
    ``grpo.generation_kwargs`` its sampler does not implement: the README may only name those. ``data.mixture``'s
    keys are the user's own source labels (which may hold dots: ``--data.mixture.notes.jsonl=2``): any name."""
    from retnet.model import RetNetConfig
    from retnet.train.config_tuning import GRPO_GENERATION_KWARGS

    return {
        "model.extra": frozenset(RetNetConfig().to_dict()),
        "grpo.generation_kwargs": frozenset(GRPO_GENERATION_KWARGS),
        "data.mixture": None,
    }


def _unknown_setting(dotted: str) -> str | None:
    """Why ``section.key[.subkey]`` names no setting, or None when it does (placeholders match any name)."""
    sections = _sections()
    section, _, rest = dotted.partition(".")
    if section not in sections:
        return f"no config section [{section}] (known: {', '.join(sections)})"
    key, _, subkey = rest.partition(".")
    if _PLACEHOLDER.fullmatch(key):
        return None
    fields = sections[section]
    matched = fnmatch.filter(fields, key)
    if not matched:
        return f"[{section}] has no field {key!r}"
    if not subkey:
        return None
    tables = [name for name in matched if _is_table(fields[name])]
    if not tables:
        return f"{section}.{key} is not a table, so it has no key {subkey!r}"
    for table in tables:
        known = _table_keys()[f"{section}.{table}"]
        if known is None or _PLACEHOLDER.fullmatch(subkey) or fnmatch.filter(known, subkey):
            return None
    return f"{section}.{key} takes no key {subkey!r}"


@functools.cache
def _entry_points() -> dict[str, str]:
    """``{"retnet-serve": "retnet.serve", ...}``: each console script and the module ``python -m`` runs alike."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    # (retnet-eval's script is retnet.extras' wrapper of retnet.train.evaluate's main, whose module imports torch)
    commands = {"retnet.extras:retnet_eval": "retnet.train.evaluate"}
    return {name: commands.get(target, target.split(":")[0].removesuffix(".__main__"))
            for name, target in scripts.items()}


class _ParserBuilt(BaseException):  # not an Exception: a main's `except Exception` lets it through
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


@functools.cache
def _options(module: str) -> frozenset[str]:
    """The options of the argument parser ``python -m module`` reads its command line with.

    Its ``main`` is stopped at its first parse, before it does anything, by a ``parse_known_args`` (which
    ``parse_args`` calls) that hands the parser back: no parser-building function is named here, and a parser
    built inside ``main`` is reached too."""
    imported = importlib.import_module(module)
    main = getattr(imported, "main", None) or importlib.import_module(f"{module}.__main__").main

    def hand_back(self, *args, **kwargs):
        raise _ParserBuilt(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", hand_back)
        try:
            main([])
        except _ParserBuilt as built:
            return frozenset(option for action in built.parser._actions for option in action.option_strings)
    raise AssertionError(f"{module}.main() returned without parsing a command line")


# ---------------------------------------------------------------------------------------------- the README's


@dataclasses.dataclass(frozen=True)
class _Mention:
    line: int  # 1-based, in README.md
    option: str  # "--max-running", "--optim.lr", or a setting's name, "optim.lr"
    # The modules of which it is a flag (of any one; "*": of any of ours); () for a training setting.
    programs: tuple[str, ...] = ()


def _is_ours(program: str | None) -> bool:
    """Whether ``program`` (a module, or ``"other:NAME"``) is one of this package's, with a parser to check."""
    return program is not None and not program.startswith("other:") and program not in _THIRD_PARTY_CLI


def _words(text: str) -> Iterator[str]:
    """Shell words of one line: quoted text blanked (a `#` or `;` in a value is no shell), comments dropped,
    separators (``|``, ``&&``, ``;``, ``&``) apart."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", lambda m: m[0][0] + " " * (len(m[0]) - 2) + m[0][-1], text)
    for word in re.sub(r"(^|\s)#.*", "", text).split():
        yield from filter(None, re.split(r"(\|\||\||&&|;|&(?!\w))", word))


def _flag_name(word: str) -> str:
    return word.split("=", 1)[0].rstrip(".,:;")


class _Command:
    """Which program the words of a shell command line go to, read word by word."""

    def __init__(self) -> None:
        self.program: str | None = None  # a module, "other:NAME", or None at the start of a command
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
            if not _ASSIGNMENT.fullmatch(word):
                name = word.rsplit("/", 1)[-1]
                self.program = _entry_points().get(name, f"other:{name}")
                # python -m MODULE, torchrun ... -m MODULE; python SCRIPT.py stays another program
                self.launcher = name in _LAUNCHERS or re.fullmatch(r"python[0-9.]*", name) is not None
        elif word == "-m" and self.launcher:
            self.expect_module = True
        elif re.match(r"--?[A-Za-z]", word):
            return self.program
        return None

    def mentions(self, number: int, words: list[str]) -> Iterator[_Mention]:
        """The flags of our programs among ``words`` (README line ``number``); retnet-train's dotted ones are
        settings, and so are checked as such."""
        for word in words:
            program = self.read(word)
            if _is_ours(program):
                name = _flag_name(word)
                yield _Mention(number, name, () if program == "retnet.train" and "." in name else (program,))


def _span_command(content: str) -> tuple[list[str], _Command] | None:
    """The words of a code span that is a shell command (``retnet-serve --model DIR``, ``curl ...``) and the
    command that is to read them; None for any other span."""
    words = list(_words(content))
    name = next((word for word in words if not _ASSIGNMENT.fullmatch(word)), "").rsplit("/", 1)[-1]
    if (name in _entry_points() or name in _LAUNCHERS or name in _OTHER_COMMANDS
            or re.fullmatch(r"python[0-9.]*", name)):
        return words, _Command()
    return None


def _program_named(span: str) -> str | None:
    """The program a code span runs, ``retnet-eval --position-edges`` or ``python -m retnet.serve``, or names by
    its module, ``retnet.serve`` (when a script runs it)."""
    if span in _entry_points().values():
        return span
    started = _span_command(span)
    if started is None:
        return None
    words, command = started
    for word in words:
        command.read(word)
    return command.program


class _Reader:
    """Reads the README top to bottom, knowing whose flag a flag written alone (`` `--max-running 64` ``) may be:
    the program named last before it in its paragraph; else the topic, the program named by the first code
    span of an earlier paragraph since the last heading (``**Evaluation.** `retnet-eval` ...``; a bold opening
    naming none ends it); else the one the headings name (``## Serving (`retnet.serve`)``). Under a heading
    naming another program (``### Weight-only int8 (`python benchmarks/quantization.py`)``), or when that one
    is another program's, the flag is taken as that program's and not checked; else it must be a flag of one of
    ours (prose names other commands' flags in passing: "The demo's model (`--config tiny` ...)" under a
    retnet-eval heading), as a renamed flag is of none."""

    def __init__(self) -> None:
        self.headed: dict[int, str | None] = {}  # heading level -> the program it names
        self.topic: str | None = None

    def mentions(self, text: str) -> Iterator[_Mention]:
        fence: str | None = None  # the language of the fenced block we are in
        command: _Command | None = None  # a shell command continued over lines ending in a backslash
        paragraph: list[tuple[int, str]] = []
        for number, line in enumerate([*text.splitlines(), ""], 1):
            yield from _dotted_overrides(number, line)
            if fence is None and line.strip() and not line.startswith(("```", "#")):
                paragraph.append((number, line))
                continue
            yield from self._paragraph(paragraph)
            paragraph = []
            if line.startswith("```"):
                fence = line[3:].strip() if fence is None else None
            elif fence in ("bash", "sh", "shell", "console"):
                command = command or _Command()
                yield from command.mentions(number, list(_words(line)))
                if not line.rstrip().endswith("\\"):
                    command = None
            elif fence is None and line.startswith("#"):
                level = len(line) - len(line.lstrip("#"))
                self.headed = {k: v for k, v in self.headed.items() if k < level}
                self.headed[level] = next(filter(None, map(_program_named, re.findall(r"`([^`]+)`", line))), None)
                self.topic = None

    def _paragraph(self, paragraph: list[tuple[int, str]]) -> Iterator[_Mention]:
        """The code spans of a paragraph (which may wrap over lines): commands, flags alone and settings."""
        text, starts = "", []
        for number, line in paragraph:
            starts.append((len(text), number))
            text += line + " "
        spans = list(re.finditer(r"`([^`]+)`", text))
        headed = next((self.headed[level] for level in sorted(self.headed, reverse=True) if self.headed[level]), None)
        topic = self.topic
        if spans and _span_command(spans[0][1].strip()):
            self.topic = _program_named(spans[0][1].strip())  # for the paragraphs after this one
        elif text.startswith("**"):
            self.topic = None
        named: list[str] = []  # the programs this paragraph names, in order
        for span in spans:
            content = span[1].strip()
            number = max((start, n) for start, n in starts if start <= span.start())[1]
            started = _span_command(content)
            if started is not None:
                words, command = started
                yield from command.mentions(number, words)
                named.append(_program_named(content))
            elif content.startswith("-"):
                owner = named[-1] if named else topic or headed
                if not _is_ours(owner) or (headed is not None and not _is_ours(headed)):
                    continue  # another program's flag, most likely
                for word in _words(content):
                    # not dotted ones: training overrides, wherever they are, which _dotted_overrides finds
                    if _FLAG.fullmatch(word):
                        yield _Mention(number, _flag_name(word), ("*",))
            else:
                yield from _setting_span(number, content, text[span.end():])


def _setting_span(number: int, content: str, after: str) -> Iterator[_Mention]:
    """A code span naming a training setting: `optim.lr`, `data.format=chat`, `data.name = ""`."""
    setting = re.match(r"([a-z_]+)\.([A-Za-z0-9_.*<>]+)(.?)", content)
    if setting is None or setting[1] not in _sections():
        return
    if setting[3] == "(" or setting[2] in _FILE_SUFFIXES:
        return  # a call, `model.load_state_dict(full)`; a file, `model.pt`
    if after.lstrip().startswith("→"):
        return  # `train.warmup_steps` → `optim.warmup_steps`: a key in the wrong section, then the field meant
    yield _Mention(number, f"{setting[1]}.{setting[2]}".rstrip("."))


def _dotted_overrides(number: int, line: str) -> Iterator[_Mention]:
    """Every ``--section.key`` of the line whose section is a real one (``--section.key=value`` describes the
    form; on a training command line every dotted flag is checked, its section too)."""
    for match in re.finditer(r"(?<![\w-])--([a-z_]+)\.([A-Za-z0-9_.*<>-]+)", line):
        if match[1] in _sections():
            yield _Mention(number, _flag_name(match[0]))


def _toml_line(lines: list[str], key: str) -> int:
    """The index of the first line defining ``key``: ``key = ...``, ``[key]`` or ``[section.key]``."""
    return next((i for i, line in enumerate(lines) if re.match(rf"\s*\[?([\w.]+\.)?{re.escape(key)}\b", line)), 0)


def _toml_mentions(text: str) -> Iterator[_Mention]:
    """The tables and keys of the README's TOML blocks, as ``section.key`` names, each on its key's line."""
    for block in re.finditer(r"^```toml\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE):
        first, lines = text.count("\n", 0, block.start()) + 2, block[1].splitlines()
        for section, table in tomllib.loads(block[1]).items():
            if not isinstance(table, dict):  # a key above every table
                yield _Mention(first + _toml_line(lines, section), section)
                continue
            for key, value in table.items():
                yield _Mention(first + _toml_line(lines, key), f"{section}.{key}")
                if isinstance(value, dict) and _is_table(_sections().get(section, {}).get(key)):
                    yield from (_Mention(first + _toml_line(lines, sub), f"{section}.{key}.{sub}") for sub in value)


# ---------------------------------------------------------------------------------------------- the tests


def test_readme_options_exist():
    text = README.read_text(encoding="utf-8")
    lines = text.splitlines()
    mentions = sorted({*_Reader().mentions(text), *_toml_mentions(text)}, key=lambda m: (m.line, m.option))
    ours = sorted({program for m in mentions for program in m.programs if program != "*"}
                  | {module for module in _entry_points().values() if _is_ours(module)})
    unknown = []
    for mention in mentions:
        programs = ours if mention.programs == ("*",) else mention.programs
        if not programs:
            why = _unknown_setting(mention.option.removeprefix("--"))
        elif any(fnmatch.filter(_options(program), mention.option) for program in programs):
            why = None  # `--prefix-cache-*` names a family of flags: one at least must exist
        elif mention.option in _REFUSED_SPELLINGS and "retnet.train" in programs:
            why = None
        else:
            why = ("no flag of any of this package's programs" if mention.programs == ("*",)
                   else f"no flag of python -m {' or '.join(programs)}")
        if why is not None:
            unknown.append(f"README.md:{mention.line}: {mention.option}: {why}\n    {lines[mention.line - 1].strip()}")
    assert not unknown, f"{len(unknown)} option(s) in the README that the code does not know:\n" + "\n".join(unknown)


def test_refused_spellings_are_refused_with_a_suggestion():
    """The README's examples of other launchers' spellings (_REFUSED_SPELLINGS) are what retnet-train says."""
    from retnet.train.config import ConfigError, parse_overrides

    for spelling in sorted(_REFUSED_SPELLINGS):
        with pytest.raises(ConfigError, match=r"did you mean --\w+\.\w+"):
            parse_overrides([f"{spelling}=1"])


def test_every_table_field_says_which_keys_it_takes():
    """A new dict-typed field must say in _table_keys which keys the README may name under it."""
    tables = {f"{section}.{name}" for section, fields in _sections().items()
              for name, annotation in fields.items() if _is_table(annotation)}
    assert tables == set(_table_keys())
