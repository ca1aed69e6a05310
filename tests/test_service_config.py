"""Server settings: one name per knob (field = TOML key = CONVRPC_ env = --flag), precedence, errors naming the key."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest

from convrpc import cli
from convrpc.server import ConfigError, ConvServer, Settings
from convrpc.server.settings import env_name, flag_name

FIELDS = dataclasses.fields(Settings)


def test_every_knob_has_help_an_env_name_and_a_flag_of_the_same_name(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    usage = capsys.readouterr().out
    for f in FIELDS:
        assert f.metadata["help"], f.name
        assert env_name(f.name) == "CONVRPC_" + f.name.upper()
        flag = re.search(re.escape(flag_name(f.name)) + r"[\s\]]", usage)
        if f.metadata.get("secret"):
            assert not flag, "secrets must not be flags (command lines are public)"
        else:
            assert flag, f.name
        assert re.search(re.escape(env_name(f.name)) + r"\b", usage), f.name
    names = {f.name for f in FIELDS}
    knobs = {"host", "port", "backend", "compute_threads", "workers", "max_message_bytes", "max_elements",
             "max_request_bytes", "max_concurrent_rpcs", "max_train_steps", "max_train_seconds", "tls_cert",
             "tls_key", "tls_client_ca", "auth_tokens_file", "metrics_port", "log_format", "log_level", "grace",
             "report_interval"}  # fmt: skip
    assert knobs <= names


def test_precedence_is_defaults_then_toml_then_env_then_flags(tmp_path):
    path = tmp_path / "convrpc.toml"
    path.write_text('port = 6000\nmax_elements = 100\nbackend = "numpy"\ngrace = 2\nlog_format = "json"\n')
    env = {"CONVRPC_MAX_ELEMENTS": "200", "CONVRPC_GRACE": "3.5", "CONVRPC_WARM_UP": "off", "OTHER": "x"}
    s = Settings.load(str(path), environ=env, flags={"grace": 7.0, "port": None})
    assert (s.port, s.max_elements, s.backend, s.grace, s.warm_up, s.log_format) == (
        6000,
        200,
        "numpy",
        7.0,
        False,
        "json",
    )
    assert s.max_train_steps == Settings().max_train_steps
    assert s.sources["port"] == f"{path}: port" and s.sources["max_elements"] == "CONVRPC_MAX_ELEMENTS"
    assert s.sources["grace"] == "--grace" and "max_train_steps" not in s.sources
    assert isinstance(s.grace, float) and Settings.load(str(path), environ={}).grace == 2.0


@pytest.mark.parametrize(
    "toml,env,flags,key",
    [
        ("", {"CONVRPC_PORT": "http"}, {}, "CONVRPC_PORT"),
        ("", {"CONVRPC_PORT": "70000"}, {}, "CONVRPC_PORT"),
        ("", {"CONVRPC_WARM_UP": "maybe"}, {}, "CONVRPC_WARM_UP"),
        ("", {"CONVRPC_GRACE": "nan"}, {}, "CONVRPC_GRACE"),
        ("prot = 1\n", {}, {}, "prot"),
        ('max_elements = "lots"\n', {}, {}, "max_elements"),
        ("warm_up = 1\n", {}, {}, "warm_up"),
        ("max_elements = 0\n", {}, {}, "max_elements"),
        ("", {}, {"backend": "tpu"}, "--backend"),
        ("", {}, {"log_format": "xml"}, "--log-format"),
        ("", {"CONVRPC_WORKERS": "-1"}, {}, "CONVRPC_WORKERS"),
        ("", {}, {"max_train_seconds": -1.0}, "--max-train-seconds"),
        ("", {}, {"tls_cert": "server.crt"}, "tls_key"),
        ("", {"CONVRPC_TLS_CLIENT_CA": "ca.crt"}, {}, "CONVRPC_TLS_CLIENT_CA"),
    ],
)
def test_a_wrong_value_is_refused_naming_its_key(tmp_path, toml, env, flags, key):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        Settings.load(str(path), environ=env, flags=flags)
    assert key in str(info.value)


def test_an_unreadable_or_invalid_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--config: cannot read"):
        Settings.load(str(tmp_path / "missing.toml"), environ={})
    (tmp_path / "bad.toml").write_text("port = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.load(str(tmp_path / "bad.toml"), environ={})


def test_print_config_is_toml_that_loads_back_to_the_same_settings(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CONVRPC_MAX_ELEMENTS", "1234")
    monkeypatch.setenv("CONVRPC_AUTH_TOKENS", "s3cret")
    flags = ["--port", "0", "--no-warm-up", "--backend", "numpy", "--max-concurrent-rpcs", "0"]
    assert cli.main(["serve", "--print-config", *flags]) == 0
    text = capsys.readouterr().out
    assert "s3cret" not in text and 'auth_tokens = "***"' in text
    assert "max_elements = 1234  # CONVRPC_MAX_ELEMENTS" in text and "warm_up = false  # --no-warm-up" in text
    slots = Settings(max_concurrent_rpcs=0).compute_slots
    assert slots >= 2
    assert f"max_concurrent_rpcs = 0  # --max-concurrent-rpcs; 0 = auto: {slots}" in text
    assert f"workers = 0  # 0 = auto: {slots + 4}" in text
    printed = tomllib.loads(text)
    printed["auth_tokens"] = "s3cret"
    (tmp_path / "c.toml").write_text("".join(f"{k} = {v!r}\n".replace("True", "true").replace("False", "false")
                                             for k, v in printed.items()))  # fmt: skip
    assert Settings.load(str(tmp_path / "c.toml"), environ={}) == Settings.load(
        environ={"CONVRPC_MAX_ELEMENTS": "1234", "CONVRPC_AUTH_TOKENS": "s3cret"},
        flags={"port": 0, "warm_up": False, "backend": "numpy", "max_concurrent_rpcs": 0},
    )


def test_serve_stops_with_a_message_naming_the_key(monkeypatch, capsys):
    monkeypatch.setenv("CONVRPC_MAX_CONCURRENT_RPCS", "-2")
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--print-config"])
    assert "CONVRPC_MAX_CONCURRENT_RPCS" in str(info.value.code)


@pytest.mark.parametrize(
    "settings,key",
    [
        (dict(tls_cert="/nonexistent/server.crt", tls_key="/nonexistent/server.key"), "tls_cert"),
        (dict(auth_tokens_file="/nonexistent/tokens"), "auth_tokens_file"),
        (dict(auth_tokens="two words"), "auth_tokens"),
    ],
)
def test_unusable_security_files_stop_start_up(settings, key):
    with pytest.raises(ConfigError) as info:
        ConvServer(Settings(host="127.0.0.1", port=0, backend="numpy", warm_up=False, **settings))
    assert info.value.key == key


def test_a_tokens_file_without_tokens_stops_start_up(tmp_path):
    (tmp_path / "tokens").write_text("# no tokens yet\n\n")
    with pytest.raises(ConfigError, match="holds no token"):
        ConvServer(Settings(port=0, backend="numpy", auth_tokens_file=str(tmp_path / "tokens")))


def test_readme_documents_every_setting():
    """The README's configuration table names every knob by its field, env var and flag."""
    import dataclasses
    import pathlib

    from convrpc.server.settings import Settings, env_name, flag_name

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    for f in dataclasses.fields(Settings):
        assert f"`{f.name}`" in readme and f"`{env_name(f.name)}`" in readme, f.name
        if f.metadata.get("flag", True):
            assert f"`{flag_name(f.name)}`" in readme, f.name


@pytest.mark.parametrize("key", ["keepalive_time", "keepalive_timeout"])
def test_a_keepalive_of_zero_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError, match=f"^{key}: must be > 0"):
        Settings(**{key: 0.0})


def test_keepalive_settings_become_the_servers_channel_options():
    options = dict(Settings(keepalive_time=2.5, keepalive_timeout=1.0, min_client_ping_interval=0.2,
                            max_ping_strikes=3).channel_options())  # fmt: skip
    assert options["grpc.keepalive_time_ms"] == 2500 and options["grpc.keepalive_timeout_ms"] == 1000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 200
    assert options["grpc.http2.max_ping_strikes"] == 3
