"""``--api-keys``, ``RETNET_API_KEYS`` and ``VLLM_API_KEY``: a key no ``Authorization: Bearer`` header can carry (a
control character; a character beyond ASCII, which the OpenAI clients refuse to send and a UTF-8 client's bytes are
read as Latin-1, another key) is refused at startup naming the setting and the key's place, never the keys (secrets):
it was accepted, a server no request could enter. Spaces and tabs inside a key are carried (``Bearer a b``)."""

from __future__ import annotations

import os

import pytest

from retnet.serve.settings import ServeSettings
from tests.serve.warm_servers import run_python

SECRET = "s3cret-key"


def test_a_key_no_header_can_carry_stops_the_server_by_its_place(tmp_path):
    # (forked from the suite's warm interpreter: warm_servers.py)
    run = run_python(["-m", "retnet.serve", "--model", str(tmp_path), "--api-keys", "ok", f"{SECRET}\nx"],
                     dict(os.environ), timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == ("retnet-serve: error: api_keys (--api-keys) key 2 of 2 holds a control character "
                                  "(U+000A), which an `Authorization: Bearer` header cannot carry (the keys are not "
                                  "shown: they are secrets)"), run.stderr


@pytest.mark.parametrize("key, what", [
    (f"{SECRET}\x00", "a control character (U+0000)"),
    (f"{SECRET}\x7f", "a control character (U+007F)"),
    (f"{SECRET}é", "a character beyond ASCII (U+00E9)"),
    (f"{SECRET}東", "a character beyond ASCII (U+6771)"),
])
def test_each_key_no_header_can_carry_is_refused(key, what, capsys):
    from retnet.serve.__main__ import parse_settings

    with pytest.raises(SystemExit) as exited:
        parse_settings(["--model", "m", "--api-keys", "ok", key])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"api_keys (--api-keys) key 2 of 2 holds {what}" in err and SECRET not in err, err


@pytest.mark.parametrize("value, message", [
    (f'["{SECRET}", ""]', "api_keys (RETNET_API_KEYS, --api-keys) must not hold a blank key; key 2 of 2 is blank"),
    (f'["{SECRET}", 1]', "api_keys (RETNET_API_KEYS, --api-keys) key 2 of 2 is int, not a string"),
    (f'["{SECRET}"', "api_keys (RETNET_API_KEYS, --api-keys) is not a JSON list: Expecting ',' delimiter"),
    (f"{SECRET}\t\x1b", "api_keys (RETNET_API_KEYS, --api-keys) key 1 of 1 holds a control character (U+001B)"),
])
def test_the_variables_refusals_never_show_the_keys(value, message, capsys, monkeypatch):
    from retnet.serve.__main__ import parse_settings

    monkeypatch.setenv("RETNET_API_KEYS", value)
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--model", "m"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and SECRET not in err, err


def test_vllms_variable_is_checked_as_the_flag_is(monkeypatch):
    monkeypatch.delenv("RETNET_API_KEYS", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", f"{SECRET}\x01x")
    with pytest.raises(ValueError, match=r"VLLM_API_KEY .* holds a control character \(U\+0001\)") as refused:
        ServeSettings(model="m")
    assert SECRET not in str(refused.value)


def test_spaces_and_tabs_inside_a_key_are_kept_a_header_carries_them():
    assert ServeSettings(model="m", api_keys=["a b", "c\td", " e "]).api_keys == ["a b", "c\td", "e"]
