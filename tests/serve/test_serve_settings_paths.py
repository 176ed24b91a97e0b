"""Settings and request limits checked against what the README promises and vLLM's server does: a limit the
operator raises is the one requests are held to, and a setting that cannot work is refused at startup naming its
flag, not after the model has loaded."""

from __future__ import annotations

import pytest

from retnet.serve.__main__ import parse_settings
from retnet.serve.settings import ServeSettings

pytestmark = pytest.mark.anyio

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0, "ignore_eos": True}


async def test_top_logprobs_is_held_to_max_logprobs_not_to_a_fixed_20(open_app):
    # README: logprobs, top_logprobs and prompt_logprobs may ask for up to --max-logprobs alternatives.
    async with open_app(max_logprobs=30) as client:
        r = await client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 25})
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 25
        r = await client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 31})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text
    async with open_app() as client:  # the default limit is still OpenAI's 20
        r = await client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 21})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text


@pytest.mark.parametrize("given, read", [("DEBUG", "debug"), (" Warning ", "warning"), ("trace", "trace")])
def test_log_level_is_read_whatever_its_case(given, read):
    # uvicorn looks the level up in lowercase: "DEBUG" was a KeyError once the model had loaded.
    assert parse_settings(["--model", "m", "--log-level", given]).log_level == read


def test_an_unknown_log_level_is_refused_at_startup(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_settings(["--model", "m", "--log-level", "verbose"])
    assert exc.value.code == 2
    assert "log_level" in capsys.readouterr().err
    monkeypatch.setenv("RETNET_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="log_level"):
        ServeSettings(model="m")


@pytest.mark.parametrize("name", ["shutdown_grace_s", "session_ttl_s"])
def test_infinite_durations_are_refused(name):
    # int(inf) for uvicorn's graceful-shutdown timeout raised OverflowError after the model had loaded.
    with pytest.raises(ValueError, match=name):
        ServeSettings(model="m", **{name: "inf"})


@pytest.mark.parametrize("level, number", [("trace", 5), ("debug", 10), ("critical", 50)])
def test_every_accepted_log_level_configures_logging(level, number):
    # uvicorn's trace is no name logging knows: basicConfig(level="TRACE") raised ValueError at startup.
    import logging

    settings = ServeSettings(model="m", log_level=level)
    assert settings.logging_level == number
    logging.getLogger("retnet-settings-test").setLevel(settings.logging_level)


@pytest.mark.parametrize("keys", ['["", "k"]', '["k", "   "]', ["k", ""]])
def test_a_blank_api_key_is_refused_not_matched_by_a_blank_bearer(keys):
    # The header's key is stripped before the compare, so a blank key let "Authorization: Bearer  " in.
    with pytest.raises(ValueError, match="api_keys"):
        ServeSettings(model="m", api_keys=keys)


def test_api_keys_are_stripped_as_the_header_is(monkeypatch):
    monkeypatch.setenv("RETNET_API_KEYS", '[" k1 ", "k2"]')
    assert ServeSettings(model="m").api_keys == ["k1", "k2"]


@pytest.mark.parametrize("flag", ["--max-loras", "--max-cpu-loras", "--session-dir", "--chat-template"])
@pytest.mark.parametrize("value", ["none", "None", ""])
def test_none_as_the_help_spells_it_is_the_default(flag, value, tmp_path, monkeypatch):
    # The help says "none: ..." for each: --session-dir none created ./none and persisted sessions there,
    # --chat-template none failed at startup as a missing file, --max-loras none was a type error.
    monkeypatch.chdir(tmp_path)
    settings = parse_settings(["--model", "m", flag, value])
    assert getattr(settings, flag[2:].replace("-", "_")) is None
    monkeypatch.setenv("RETNET_" + flag[2:].replace("-", "_").upper(), value)
    assert getattr(ServeSettings(model="m"), flag[2:].replace("-", "_")) is None


@pytest.mark.parametrize("flag", ["--download-dir", "--revision", "--served-model-name"])
def test_an_empty_optional_string_is_the_default(flag):
    # RETNET_DOWNLOAD_DIR= (a compose file's unset ${VAR:-}) downloaded into the working directory.
    assert getattr(parse_settings(["--model", "m", flag, ""]), flag[2:].replace("-", "_")) is None


def test_a_chat_template_file_named_none_is_still_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "none").write_text("{{ messages }}")
    assert parse_settings(["--model", "m", "--chat-template", "none"]).chat_template == "none"


def test_a_null_max_new_tokens_override_drops_the_files_value(tmp_path):
    # vLLM's rule: an override's null removes the field, so the server's default applies (it was a TypeError at
    # startup).
    from retnet.serve.settings import generation_defaults, resolve_max_tokens

    (tmp_path / "generation_config.json").write_text('{"max_new_tokens": 50, "temperature": 0.3}')
    settings = ServeSettings(model=str(tmp_path), override_generation_config='{"max_new_tokens": null}')
    defaults = generation_defaults(settings)
    assert defaults == {"temperature": 0.3}
    assert resolve_max_tokens(settings, defaults) == 256


@pytest.mark.parametrize(("flags", "variable", "shown"), [
    (["--api-keys", ","], None, ","), (["--api-keys", " , "], None, " , "), (["--api-keys", "k1", ","], None, ","),
    ([], ",", ","),
])
def test_api_keys_that_name_no_key_are_refused_not_read_as_no_auth(flags, variable, shown, monkeypatch, capsys):
    # `--api-keys ,` was the empty list: the server, asked for keys, ran without auth.
    if variable is not None:
        monkeypatch.setenv("RETNET_API_KEYS", variable)
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--model", "m", *flags])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    source = "RETNET_API_KEYS, --api-keys" if variable is not None else "--api-keys"
    assert f"api_keys ({source}) names no key; got {shown!r}" in err, err
    monkeypatch.setenv("RETNET_API_KEYS", "")  # empty (a compose file's unset ${VAR:-}): still no auth, as unset
    assert parse_settings(["--model", "m"]).api_keys == []


def test_a_repeated_lora_modules_flag_adds_and_a_name_given_twice_is_refused(capsys):
    # argparse kept the last flag's values alone: the first flag's adapters were dropped, and a name given again
    # in a second flag silently took its new path.
    settings = parse_settings(["--model", "m", "--lora-modules", "a=/x", "--lora-modules", "b=/y"])
    assert [(m["name"], m["path"]) for m in settings.lora_modules] == [("a", "/x"), ("b", "/y")]
    with pytest.raises(SystemExit) as exited:
        parse_settings(["--model", "m", "--lora-modules", "a=/x", "--lora-modules", "a=/y"])
    assert exited.value.code == 2
    assert "'a' is given twice" in capsys.readouterr().err
    assert parse_settings(["--model", "m", "--api-keys", "k1", "--api-keys", "k2"]).api_keys == ["k1", "k2"]


def test_dir_of_the_package_lists_its_lazy_exports():
    # ServeSettings is loaded on first use (__getattr__); dir() and a REPL's completion left it out.
    import retnet.serve

    assert set(retnet.serve.__all__) <= set(dir(retnet.serve))
    assert all(hasattr(retnet.serve, name) for name in dir(retnet.serve))
