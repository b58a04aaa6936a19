"""The one typed settings tree, read from ``cortex.toml`` and overridden by ``CORTEX_*`` variables.

Who reads what: the engine reads ``poll``, ``eviction``, ``nodes`` and ``models``; the gateway reads
``gateway``; the console reads ``tui`` (a headless run ignores it). Every field carries its default and
an attribute docstring: those docstrings are the source of the comments in the example ``cortex.toml``.

The file is found in this order: ``--config``, ``$CORTEX_CONFIG``, ``./cortex.toml``,
``~/.config/cortex/cortex.toml``. Environment variables win over the file
(``CORTEX_GATEWAY__LISTEN=127.0.0.1:8000``). Validation errors become one ``key.path: problem`` line each
(:func:`format_validation_error`), and the CLI exits 2 on them.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

__all__ = [
    "ClusterSettings",
    "ConfigFileError",
    "EvictionSettings",
    "GatewaySettings",
    "ModelSettings",
    "NodeSettings",
    "PollSettings",
    "Settings",
    "TuiSettings",
    "find_config_file",
    "format_validation_error",
    "load_settings",
    "parse_listen",
]


class ConfigFileError(Exception):
    """The config cannot be read: a missing file, invalid TOML, or a ``CORTEX_*`` variable that is not JSON."""


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:8000`` for IPv6) into its parts.

    Raises:
        ValueError: when the address has no port, a bad port or an empty host.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8000")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address (expected [ADDR]:PORT)") from None
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host, port


def _check_listen(value: str) -> str:
    parse_listen(value)
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class GatewaySettings(_Section):
    """``[gateway]``: the client API, the admin API and the metrics endpoint."""

    listen: str = "0.0.0.0:8000"
    """Address of the client API and the admin API (HOST:PORT)."""
    metrics_listen: str = "0.0.0.0:9100"
    """Address of the Prometheus /metrics endpoint (HOST:PORT); empty to serve metrics on `listen` only."""
    api_keys: list[SecretStr] = Field(default_factory=list)
    """When non-empty, clients must send one of these keys (Bearer token or x-api-key)."""
    admin_token: SecretStr = SecretStr("")
    """Bearer token for the admin API; empty means loopback clients only."""
    first_byte_timeout_s: float = Field(default=600.0, gt=0)
    """Seconds to wait for a node's first byte (a cold load can take minutes)."""
    stream_idle_timeout_s: float = Field(default=300.0, gt=0)
    """Seconds a stream may stay silent before cortex gives up on it."""
    queue_timeout_s: float = Field(default=300.0, gt=0)
    """Seconds a request may wait for its model to be placed and loaded."""
    load_timeout_s: float = Field(default=900.0, gt=0)
    """Seconds one model load may take on a node before cortex gives up on that node and tries the next one
    that lists the model (a node marked down gives up its loads at once). Real loads take minutes."""
    max_queue: int = Field(default=1024, gt=0)
    """Requests that may wait per model; beyond it 503 (OpenAI) / 529 (Anthropic)."""
    max_body_mb: float = Field(default=32.0, gt=0)
    """Largest request body accepted, in MiB (413 beyond). 32 is the Anthropic API's own limit: a larger
    body is rare and costs the gateway's loop time to parse and translate."""
    max_response_mb: float = Field(default=64.0, gt=0)
    """Largest non-streaming answer read from a node, in MiB (502 beyond); streams pass through uncapped."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds a new client connection has to send its first request head, and the longest silence while
    a request body arrives; the connection is closed after it."""
    keepalive_timeout_s: float = Field(default=15.0, gt=0)
    """Seconds an idle client keep-alive connection stays open (a later request's head must arrive within it)."""
    max_connections: int = Field(default=2048, gt=0)
    """Client connections open at once; beyond it a new one gets 503 and is closed (kept below the process's
    open-file limit; the effective figure is logged at start)."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """The event loop the gateway runs on: `uvloop` (libuv, about a fifth less CPU per request), `asyncio`
    (the standard library's), or `auto` (uvloop when installed). Read at start."""
    metrics_token: SecretStr = SecretStr("")
    """When set, /metrics requires `Authorization: Bearer TOKEN` (on both `listen` and `metrics_listen`)."""
    admin_hosts: list[str] = Field(default_factory=list)
    """Host names, besides loopback addresses and `localhost`, that admin requests may carry in `Host` when
    `admin_token` is empty (a browser page on another name is refused: DNS rebinding)."""
    drain_s: float = Field(default=30.0, ge=0)
    """On shutdown, seconds in-flight streams may take to finish."""
    record: str = ""
    """Append one JSON line per finished request to this file, for `cortex replay` (empty: off). A line holds
    when, which model and node, how long the node was busy, token counts and the wait for a load; no prompt
    text, no client identity."""
    record_max_mb: float = Field(default=256.0, gt=0)
    """Size at which the record file is rotated to `PATH.1` (the previous `.1` is replaced)."""
    watch_config: bool = False
    """Re-read this file when it changes (checked every 2 s), as SIGHUP and `cortex reload` do."""

    _listen = field_validator("listen")(_check_listen)

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str) -> str:
        return value if value == "" else _check_listen(value)


class EvictionSettings(_Section):
    """``[eviction]``: which models leave a node's VRAM, and when."""

    strategy: Literal["lru", "priority", "cost"] = "cost"
    """Victim order: `cost` (cheapest expected miss: reload time x chance of reuse soon, per MiB freed, from
    each model's bursts of requests; a model seen in one burst only, like an evaluation scan's, goes first),
    `lru` (least recently used) or `priority` (lowest priority, then LRU); `cortex replay` compares them."""
    idle_ttl_s: float = Field(default=0.0, ge=0)
    """Unload a model idle this long (0 = never); pinned models stay."""
    headroom_mb: int = Field(default=512, ge=0)
    """VRAM kept free on every node, in MiB."""
    min_resident_s: float = Field(default=0.0, ge=0)
    """A freshly loaded model is never evicted sooner than this (a floor you may set). Without it cortex
    already protects a model loaded for waiting requests for twice its measured load time while it serves
    them (its fairness quantum), and lets it go as soon as its requests stop."""
    defrag_after_cycles: int = Field(default=50, ge=0)
    """Restart a node's server after this many eviction cycles (0 = never)."""


class PollSettings(_Section):
    """``[poll]``: how often and how patiently nodes are polled."""

    interval_s: float = Field(default=2.0, gt=0)
    """Seconds between polls of each node."""
    timeout_s: float = Field(default=2.0, gt=0)
    """Timeout of one poll request."""
    down_after: int = Field(default=3, gt=0)
    """Failed polls before a node is marked down."""


class TuiSettings(_Section):
    """``[tui]``: the console. Ignored by ``--no-tui``."""

    theme: str = "cortex-dark"
    """A theme file in `theme_dir` (without .toml) or a built-in Textual theme."""
    theme_dir: str = ""
    """Folder of theme files; empty = the `themes/` folder shipped with cortex."""
    refresh_hz: float = Field(default=4.0, gt=0, le=60)
    """Console redraws per second."""


class ClusterSettings(_Section):
    """``[cluster]``: several gateways on one fleet, coordinated through Redis (empty `redis_url`: one gateway)."""

    redis_url: SecretStr = SecretStr("")
    """Redis shared by every gateway of the fleet (`redis://HOST:6379/0`, `rediss://`, `unix:///path`); empty =
    a single gateway, no Redis needed. A secret: it may carry a password, and it is never logged."""
    name: str = Field(default="", pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._:-]*$")
    """This gateway's name among the others (unique); empty = `HOSTNAME:PORT` of `gateway.listen`."""
    lease_ttl_s: float = Field(default=10.0, gt=0, le=300)
    """Seconds a node's lifecycle lease outlives its holder's last renewal: a gateway that dies mid-load is
    replaced by another one within this time (renewed every third of it)."""

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value()
        if text and urlsplit(text).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("not a Redis URL (expected redis://HOST:PORT/DB, rediss://... or unix:///PATH)")
        return value


def _check_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not a URL (expected http://HOST:PORT)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported (cortex sends no authentication to nodes)")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError("not a URL (bad port)") from None
    return value.rstrip("/")


class NodeSettings(_Section):
    """``[[nodes]]``: one mistral.rs server."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Unique node name (letters, digits, `.`, `_`, `-`)."""
    endpoint: str
    """Base URL of the node's mistralrs server (``https://`` is verified against the system trust store)."""
    vram_mb: int = Field(gt=0)
    """GPU memory of the node in MiB."""
    pinned: list[str] = Field(default_factory=list)
    """Models loaded at start and never evicted from this node."""
    agent_token: SecretStr = SecretStr("")
    """The token this node's agent must present (empty = reports refused)."""

    _endpoint = field_validator("endpoint")(_check_url)


class ModelSettings(_Section):
    """``[[models]]``: optional facts about a model; every key but `id` is optional."""

    id: str = Field(min_length=1)
    """The model id as the nodes list it."""
    vram_mb: int | None = Field(default=None, gt=0)
    """Footprint in MiB; when absent, learned from the VRAM change on load."""
    priority: int = 0
    """Higher stays longer under strategy = "priority"."""
    aliases: list[str] = Field(default_factory=list)
    """Other names clients may use; globs allowed (`claude-opus-*`)."""
    max_output_tokens: int | None = Field(default=None, gt=0)
    """Clamp for requests that ask for more output tokens."""


def _default_config_path() -> Path | None:
    return None


class Settings(BaseSettings):
    """The whole of ``cortex.toml``."""

    model_config = SettingsConfigDict(
        env_prefix="CORTEX_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    """The client API, admin API and metrics endpoint."""
    eviction: EvictionSettings = Field(default_factory=EvictionSettings)
    """Eviction policy and VRAM headroom."""
    poll: PollSettings = Field(default_factory=PollSettings)
    """Node polling."""
    tui: TuiSettings = Field(default_factory=TuiSettings)
    """The console."""
    nodes: list[NodeSettings] = Field(default_factory=list)
    """The fleet."""
    models: list[ModelSettings] = Field(default_factory=list)
    """Facts about models (footprint, priority, aliases)."""
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    """Other gateways sharing this fleet (Redis)."""

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: set[str] = set()
        for node in self.nodes:
            if node.name in seen:
                raise ValueError(f"nodes: duplicate node name {node.name!r}")
            seen.add(node.name)
        ids: set[str] = set()
        for model in self.models:
            if model.id in ids:
                raise ValueError(f"models: duplicate model id {model.id!r}")
            ids.add(model.id)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_PATH.get("path")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def model_facts(self, model_id: str) -> ModelSettings | None:
        """The ``[[models]]`` entry for a model id, if any."""
        for model in self.models:
            if model.id == model_id:
                return model
        return None

    def pinned_models(self) -> list[str]:
        """Every model pinned in config, in node order, without repeats."""
        out: list[str] = []
        for node in self.nodes:
            out.extend(m for m in node.pinned if m not in out)
        return out


# The file path for the TOML source. pydantic-settings calls settings_customise_sources as a classmethod
# with no way to pass arguments, so load_settings() sets this for the duration of one construction.
_CONFIG_PATH: dict[str, Path | None] = {"path": None}


def find_config_file(explicit: str | None) -> Path | None:
    """Resolve the config file: ``--config``, ``$CORTEX_CONFIG``, ``./cortex.toml``, the user's config.

    Raises:
        ConfigFileError: when an explicitly named file (flag or variable) does not exist.
    """
    for label, candidate in (("--config", explicit), ("CORTEX_CONFIG", os.environ.get("CORTEX_CONFIG"))):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise ConfigFileError(f"{label}: no such file {str(path)!r}")
            return path
    for path in (Path("cortex.toml"), Path("~/.config/cortex/cortex.toml").expanduser()):
        if path.is_file():
            return path
    return None


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Build the settings from a TOML file (or none), the environment and keyword overrides.

    Raises:
        ConfigFileError: when the file is not valid TOML, or a variable for a list or table is not JSON.
        pydantic.ValidationError: when a value is wrong; format it with :func:`format_validation_error`.
    """
    if path is not None:
        import tomllib

        try:
            with path.open("rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigFileError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigFileError(f"{path}: {exc.strerror}") from None
    _CONFIG_PATH["path"] = path
    try:
        return Settings(**overrides)
    except SettingsError as exc:  # pydantic-settings could not decode a variable (not a ValidationError)
        raise ConfigFileError(_env_problem(exc)) from None
    finally:
        _CONFIG_PATH["path"] = None


def _env_problem(exc: SettingsError) -> str:
    """Name the ``CORTEX_*`` variable for a list or table whose value is not JSON (``key.path: problem``)."""
    for var, value in sorted(os.environ.items()):
        parts = var[len("CORTEX_") :].lower().split("__")
        if not var.upper().startswith("CORTEX_") or not _is_complex(parts):
            continue
        try:
            json.loads(value)
        except ValueError as err:
            return f"{'.'.join(parts)}: environment variable {var} must be JSON ({err})"
    return f"environment: {exc}"


def _is_complex(parts: list[str]) -> bool:
    """Whether a key path names a table or a list (values pydantic-settings decodes as JSON)."""
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        return i == len(parts) - 1 and get_origin(annotation) in (list, dict)
    return True


def _loc_to_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-after", "function-before", "function-wrap")):
            continue
        else:
            out += ("." if out else "") + part
    return out


def format_validation_error(exc: ValidationError) -> list[str]:
    """One ``key.path: problem`` line per error, in the order pydantic found them."""
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        path = _loc_to_path(err["loc"])
        msg = str(err["msg"])
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix) :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if not path and ": " in msg:
            lines.append(msg)
            continue
        lines.append(f"{path or '(top level)'}: {msg}")
    return lines
