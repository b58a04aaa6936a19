"""``Settings`` from TOML written to ``tmp_path``: every key's validation, env overrides, the file search order."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from cortex.config import (
    ConfigFileError,
    Settings,
    find_config_file,
    format_validation_error,
    load_settings,
    parse_listen,
)

ROOT = Path(__file__).resolve().parents[2]

NODE = '[[nodes]]\nname = "n1"\nendpoint = "http://127.0.0.1:1234"\nvram_mb = 8192\n'


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No stray CORTEX_* variables, and no ./cortex.toml or ~/.config file unless a test writes one."""
    import os

    for key in list(os.environ):
        if key.startswith("CORTEX_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def write(tmp_path: Path, text: str, name: str = "cortex.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_for(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ValidationError) as exc:
        load_settings(write(tmp_path, text))
    return format_validation_error(exc.value)


def test_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, ""))
    assert s.gateway.listen == "0.0.0.0:8000"
    assert s.gateway.metrics_listen == "0.0.0.0:9100"
    assert s.gateway.api_keys == []
    assert s.gateway.admin_token.get_secret_value() == ""
    assert (s.gateway.first_byte_timeout_s, s.gateway.stream_idle_timeout_s, s.gateway.queue_timeout_s) == (
        600,
        300,
        300,
    )
    assert (s.gateway.max_queue, s.gateway.max_body_mb, s.gateway.drain_s) == (1024, 32, 30)
    assert s.eviction.strategy == "cost"
    assert (s.eviction.idle_ttl_s, s.eviction.headroom_mb, s.eviction.min_resident_s) == (0, 512, 0)
    assert s.eviction.defrag_after_cycles == 50
    assert (s.poll.interval_s, s.poll.timeout_s, s.poll.down_after) == (2.0, 2.0, 3)
    assert (s.tui.theme, s.tui.refresh_hz) == ("cortex-dark", 4)
    assert s.nodes == []
    assert s.models == []


def test_a_full_file_is_read(tmp_path: Path) -> None:
    s = load_settings(
        write(
            tmp_path,
            """
[gateway]
listen = "[::1]:8080"
metrics_listen = ""
api_keys = ["k1", "k2"]
admin_token = "adm-s3cret"
[eviction]
strategy = "priority"
[[nodes]]
name = "gpu-a.1"
endpoint = "https://gpu-a:1234/"
vram_mb = 24_576
pinned = ["org/m"]
agent_token = "agt-s3cret"
[[models]]
id = "org/m"
vram_mb = 4000
priority = 3
aliases = ["gpt-*"]
max_output_tokens = 1000
""",
        )
    )
    assert parse_listen(s.gateway.listen) == ("::1", 8080)
    assert [k.get_secret_value() for k in s.gateway.api_keys] == ["k1", "k2"]
    assert s.gateway.admin_token.get_secret_value() == "adm-s3cret"
    assert s.eviction.strategy == "priority"
    assert s.nodes[0].endpoint == "https://gpu-a:1234"  # trailing slash dropped
    assert s.nodes[0].agent_token.get_secret_value() == "agt-s3cret"
    assert s.pinned_models() == ["org/m"]
    facts = s.model_facts("org/m")
    assert facts is not None
    assert facts.aliases == ["gpt-*"]
    assert facts.max_output_tokens == 1000
    assert "s3cret" not in repr(s)
    assert "s3cret" not in s.model_dump_json()


BAD: list[tuple[str, str, str]] = [
    # (TOML, expected key path, a word of the problem)
    ('[gateway]\nlisten = "8000"', "gateway.listen", "HOST:PORT"),
    ('[gateway]\nlisten = "localhost:http"', "gateway.listen", "not a number"),
    ('[gateway]\nlisten = "0.0.0.0:70000"', "gateway.listen", "out of range"),
    ('[gateway]\nlisten = ":8000"', "gateway.listen", "HOST:PORT"),
    ('[gateway]\nlisten = "[zz]:80"', "gateway.listen", "IPv6"),
    ('[gateway]\nmetrics_listen = "nope"', "gateway.metrics_listen", "HOST:PORT"),
    ("[gateway]\nfirst_byte_timeout_s = 0", "gateway.first_byte_timeout_s", "greater than 0"),
    ("[gateway]\nstream_idle_timeout_s = -1", "gateway.stream_idle_timeout_s", "greater than 0"),
    ("[gateway]\nqueue_timeout_s = 0", "gateway.queue_timeout_s", "greater than 0"),
    ("[gateway]\nmax_queue = 0", "gateway.max_queue", "greater than 0"),
    ("[gateway]\nmax_body_mb = 0", "gateway.max_body_mb", "greater than 0"),
    ("[gateway]\ndrain_s = -1", "gateway.drain_s", "greater than or equal to 0"),
    ('[gateway]\napi_keys = "one"', "gateway.api_keys", "list"),
    ("[gateway]\nbogus = 1", "gateway.bogus", "unknown key"),
    ('[eviction]\nstrategy = "fifo"', "eviction.strategy", "'lru', 'priority' or 'cost'"),
    ("[eviction]\nidle_ttl_s = -5", "eviction.idle_ttl_s", "greater than or equal to 0"),
    ("[eviction]\nheadroom_mb = -1", "eviction.headroom_mb", "greater than or equal to 0"),
    ("[eviction]\nmin_resident_s = -1", "eviction.min_resident_s", "greater than or equal to 0"),
    ("[eviction]\ndefrag_after_cycles = -1", "eviction.defrag_after_cycles", "greater than or equal to 0"),
    ("[poll]\ninterval_s = 0", "poll.interval_s", "greater than 0"),
    ("[poll]\ntimeout_s = 0", "poll.timeout_s", "greater than 0"),
    ("[poll]\ndown_after = 0", "poll.down_after", "greater than 0"),
    ("[tui]\nrefresh_hz = 0", "tui.refresh_hz", "greater than 0"),
    ("[tui]\nrefresh_hz = 100", "tui.refresh_hz", "less than or equal to 60"),
    ("[surprise]\nx = 1", "surprise", "unknown key"),
    ('[[nodes]]\nname = "n"\nendpoint = "not a url"\nvram_mb = 1', "nodes[0].endpoint", "not a URL"),
    ('[[nodes]]\nname = "n"\nendpoint = "ftp://host:21"\nvram_mb = 1', "nodes[0].endpoint", "not a URL"),
    ('[[nodes]]\nname = "n"\nendpoint = "http://host:99999"\nvram_mb = 1', "nodes[0].endpoint", "bad port"),
    ('[[nodes]]\nname = "n"\nendpoint = "http://:80"\nvram_mb = 1', "nodes[0].endpoint", "not a URL"),
    ('[[nodes]]\nname = "n"\nendpoint = "http://h:1"\nvram_mb = 0', "nodes[0].vram_mb", "greater than 0"),
    ('[[nodes]]\nname = "bad name"\nendpoint = "http://h:1"\nvram_mb = 1', "nodes[0].name", "pattern"),
    ('[[nodes]]\nname = ""\nendpoint = "http://h:1"\nvram_mb = 1', "nodes[0].name", "at least 1"),
    ('[[nodes]]\nname = "n"\nvram_mb = 1', "nodes[0].endpoint", "required"),
    ('[[nodes]]\nname = "n"\nendpoint = "http://h:1"', "nodes[0].vram_mb", "required"),
    ('[[nodes]]\nname = "n"\nendpoint = "http://h:1"\nvram_mb = 1\npinned = "m"', "nodes[0].pinned", "list"),
    ('[[nodes]]\nname = "n"\nendpoint = "http://h:1"\nvram_mb = 1\ncolour = 1', "nodes[0].colour", "unknown key"),
    (NODE + NODE, "nodes", "duplicate node name 'n1'"),
    ('[[models]]\nid = "m"\n[[models]]\nid = "m"', "models", "duplicate model id 'm'"),
    ("[[models]]\nvram_mb = 3", "models[0].id", "required"),
    ('[[models]]\nid = "m"\nvram_mb = 0', "models[0].vram_mb", "greater than 0"),
    ('[[models]]\nid = "m"\nmax_output_tokens = 0', "models[0].max_output_tokens", "greater than 0"),
    ('[[models]]\nid = "m"\npriority = "high"', "models[0].priority", "integer"),
    ('[[models]]\nid = "m"\naliases = "gpt-4o"', "models[0].aliases", "list"),
]


@pytest.mark.parametrize(("toml", "path", "problem"), BAD, ids=[f"{i:02d}-{b[1]}" for i, b in enumerate(BAD)])
def test_each_bad_value_names_its_key_path(tmp_path: Path, toml: str, path: str, problem: str) -> None:
    lines = errors_for(tmp_path, toml)
    assert len(lines) == 1, lines
    key, _, message = lines[0].partition(": ")
    assert key == path, lines
    assert problem.lower() in message.lower(), lines


def test_every_error_is_reported_not_just_the_first(tmp_path: Path) -> None:
    lines = errors_for(
        tmp_path,
        '[gateway]\nlisten = "x"\nmax_queue = 0\n[poll]\ndown_after = 0\n'
        '[[nodes]]\nname = "a"\nendpoint = "http://h:1"\nvram_mb = 1\n'
        '[[nodes]]\nname = "b"\nendpoint = "nope"\nvram_mb = 1\n',
    )
    assert [line.split(": ")[0] for line in lines] == [
        "gateway.listen",
        "gateway.max_queue",
        "poll.down_after",
        "nodes[1].endpoint",
    ]


@pytest.mark.parametrize(
    "listen",
    ["127.0.0.1:8000", "0.0.0.0:0", "[::1]:8000", "[::]:9", "gpu.internal:65535", "localhost:1"],
)
def test_good_listen_addresses(tmp_path: Path, listen: str) -> None:
    s = load_settings(write(tmp_path, f'[gateway]\nlisten = "{listen}"\nmetrics_listen = "{listen}"'))
    assert s.gateway.listen == listen


def test_priority_strategy_is_accepted(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, '[eviction]\nstrategy = "priority"')).eviction.strategy == "priority"


def test_invalid_toml_is_a_config_file_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="not valid TOML"):
        load_settings(write(tmp_path, "[gateway\nlisten = 1"))


def test_env_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[gateway]\nlisten = "0.0.0.0:8000"\nmax_queue = 5\n' + NODE)
    monkeypatch.setenv("CORTEX_GATEWAY__LISTEN", "127.0.0.1:9999")
    monkeypatch.setenv("CORTEX_EVICTION__STRATEGY", "priority")
    monkeypatch.setenv("CORTEX_POLL__DOWN_AFTER", "7")
    s = load_settings(path)
    assert s.gateway.listen == "127.0.0.1:9999"
    assert s.eviction.strategy == "priority"
    assert s.poll.down_after == 7
    assert s.gateway.max_queue == 5  # the rest of the file still applies
    assert s.nodes[0].name == "n1"


def test_a_bad_env_value_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_GATEWAY__LISTEN", "nowhere")
    with pytest.raises(ValidationError) as exc:
        load_settings(write(tmp_path, ""))
    assert [line.split(": ")[0] for line in format_validation_error(exc.value)] == ["gateway.listen"]


def test_env_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_GATEWAY__MAX_BODY_MB", "0.5")
    assert load_settings(None).gateway.max_body_mb == 0.5


def test_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = tmp_path / "home" / ".config" / "cortex" / "cortex.toml"
    user.parent.mkdir(parents=True)
    user.write_text("")
    local = write(tmp_path, "")  # ./cortex.toml (cwd is tmp_path)
    named = write(tmp_path, "", "named.toml")
    env = write(tmp_path, "", "env.toml")

    assert find_config_file(str(named)) == named  # --config first
    monkeypatch.setenv("CORTEX_CONFIG", str(env))
    assert find_config_file(str(named)) == named
    assert find_config_file(None) == env  # then $CORTEX_CONFIG
    monkeypatch.delenv("CORTEX_CONFIG")
    found = find_config_file(None)
    assert found is not None
    assert found.resolve() == local.resolve()  # then ./cortex.toml
    local.unlink()
    assert find_config_file(None) == user  # then the user's file
    user.unlink()
    assert find_config_file(None) is None


def test_explicit_missing_files_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "")  # a ./cortex.toml must not be used instead of a named file that is missing
    with pytest.raises(ConfigFileError, match="--config"):
        find_config_file(str(tmp_path / "missing.toml"))
    monkeypatch.setenv("CORTEX_CONFIG", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigFileError, match="CORTEX_CONFIG"):
        find_config_file(None)


def test_loading_one_file_does_not_leak_into_the_next(tmp_path: Path) -> None:
    load_settings(write(tmp_path, NODE))
    assert Settings().nodes == []  # the TOML source is only active inside load_settings


# -- the example cortex.toml ----------------------------------------------------------------------------


def _missing_fields(model: type[BaseModel], data: Any, path: str) -> list[str]:
    """Fields of ``model`` (recursively) that ``data`` (the parsed TOML) never sets."""
    missing: list[str] = []
    entries = data if isinstance(data, list) else [data]
    for name, info in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        present = [e[name] for e in entries if isinstance(e, dict) and name in e]
        if not present:
            missing.append(key)
            continue
        annotation = info.annotation
        args = getattr(annotation, "__args__", ())
        inner = args[0] if args and getattr(annotation, "__origin__", None) is list else annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            flat = [x for p in present for x in (p if isinstance(p, list) else [p])]
            missing += _missing_fields(inner, flat, key)
    return missing


def test_example_config_validates_and_covers_every_field() -> None:
    example = ROOT / "cortex.toml"
    settings = load_settings(example)
    assert len(settings.nodes) >= 1
    with example.open("rb") as fh:
        raw = tomllib.load(fh)
    assert _missing_fields(Settings, raw, "") == []


def test_the_coverage_check_would_notice_a_missing_field() -> None:
    assert _missing_fields(Settings, {"gateway": {}, "nodes": [{"name": "x"}]}, "")[:2] == [
        "gateway.listen",
        "gateway.metrics_listen",
    ]


@pytest.mark.parametrize(
    ("var", "value", "path"),
    [
        ("CORTEX_GATEWAY__API_KEYS", "k1", "gateway.api_keys"),
        ("CORTEX_NODES", "gpu-a", "nodes"),
        ("CORTEX_GATEWAY", "listen=1", "gateway"),
    ],
    ids=["list-in-section", "top-level-list", "section"],
)
def test_a_non_json_env_value_for_a_list_or_table_names_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, path: str
) -> None:
    monkeypatch.setenv("CORTEX_GATEWAY__LISTEN", "127.0.0.1:1")  # a plain value beside it is not blamed
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigFileError) as exc:
        load_settings(write(tmp_path, ""))
    assert str(exc.value).startswith(f"{path}: environment variable {var} must be JSON"), exc.value


def test_json_env_values_for_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORTEX_GATEWAY__API_KEYS", '["k1", "k2"]')
    monkeypatch.setenv("CORTEX_NODES", '[{"name": "a", "endpoint": "http://a:1", "vram_mb": 5}]')
    s = load_settings(None)
    assert [k.get_secret_value() for k in s.gateway.api_keys] == ["k1", "k2"]
    assert s.nodes[0].endpoint == "http://a:1"
