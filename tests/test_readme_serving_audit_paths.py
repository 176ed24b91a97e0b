"""What the README's serving part promises of `retnet-serve --help`: "Every flag is also a `RETNET_*` environment
variable ... `retnet-serve --help` lists them". A listing is only useful if each flag says what it bounds: five
request and session limits were printed with their own field name as their help."""

from __future__ import annotations

import pytest

from retnet.serve.settings import ServeSettings


@pytest.mark.parametrize("name", sorted(ServeSettings.model_fields))
def test_every_serve_setting_has_a_description_for_help(name):
    description = ServeSettings.model_fields[name].description
    assert description, f"--{name.replace('_', '-')} has no description: --help would print only its name"
    assert description.strip() != name, f"--{name.replace('_', '-')}: the description is the field's own name"


def test_help_describes_the_request_and_session_limits(capsys):
    from retnet.serve.__main__ import parse_settings

    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--help"])
    assert exit_info.value.code == 0
    options = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for flag, words in [
        ("--max-prompt-tokens", "most tokens a prompt may have"),
        ("--max-n", "choices per prompt"),
        ("--max-stop-chars", "longest stop string"),
        ("--max-body-bytes", "largest request body"),
        ("--session-bytes", "bytes the sessions held in memory may take"),
    ]:
        metavar = flag.removeprefix("--").replace("-", "_").upper()
        after = options.split(f"{flag} {metavar} ", 1)[1]
        assert words in after[:300], f"{flag}: {after[:200]!r}"
