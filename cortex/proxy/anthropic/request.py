"""Anthropic Messages request → OpenAI Chat Completions request for a mistral.rs node.

The translation is lenient where clients are sloppy and strict where the backend would fail
late (translation.md §3.1, §3.2): unknown body fields, ``cache_control`` and beta extras are
dropped, an oversized ``max_tokens`` is clamped rather than refused (Claude Code retries a 400
unchanged, six times), and server tools are dropped with a warning; but a structurally wrong
body (no ``max_tokens``, a PDF, an unsupported image) raises :class:`AnthropicError` 400 up
front. Stop sequences are *not* forwarded: mistral.rs cuts at a stop string and reports a plain
``stop``, which loses the matched string, so cortex matches them itself (§3.5) and the result
carries them for the response side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ._messages import MessageConverter, ToolNames, bad_request, mistral_id, system_text
from .count_tokens import estimate_input_tokens

__all__ = ["Dialect", "OpenAIRequest", "to_openai"]

Dialect = Literal["mistralrs", "openai"]
"""``mistralrs`` sends its extensions (``top_k``, ``enable_thinking``, ``xhigh`` effort,
``reasoning_content`` in history); ``openai`` keeps to fields a strict backend accepts."""

_EFFORTS: dict[str, tuple[str, str]] = {  # Anthropic effort -> (mistralrs, openai)
    "low": ("low", "low"),
    "medium": ("medium", "medium"),
    "high": ("high", "high"),
    "xhigh": ("xhigh", "high"),
    "max": ("xhigh", "high"),
}


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """The translated request, plus what the response side needs to know.

    Attributes:
        body: The OpenAI Chat Completions body, ready to serialise. It may share nested
            objects (tool schemas, strings) with the client's body: do not mutate either.
        stream: Whether the *client* asked for a stream.
        stop_sequences: The client's stop sequences, to be matched by cortex.
        thinking: Whether reasoning should be returned as thinking blocks.
        tool_aliases: Upstream tool name → client tool name, for the names that were renamed.
        input_tokens_estimate: The prompt-size estimate for ``message_start`` and error messages.
        warnings: Lossy choices worth a log line (a dropped server tool, an unknown block).
    """

    body: dict[str, Any]
    stream: bool
    stop_sequences: tuple[str, ...] = ()
    thinking: bool = False
    tool_aliases: Mapping[str, str] = field(default_factory=dict)
    input_tokens_estimate: int = 1
    warnings: tuple[str, ...] = ()


def _number(body: Mapping[str, Any], key: str) -> float | int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{key}: Input should be a valid number")
    return value


def _tools(tools: Any, names: ToolNames, warnings: list[str]) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad_request("tools: Input should be an array")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise bad_request(f"tools.{i}: Input should be an object")
        kind, name = tool.get("type"), tool.get("name")
        if kind not in (None, "custom"):
            warnings.append(f"dropped server tool {name or kind!r} (type {kind!r}): the backend cannot run it")
            continue
        if not isinstance(name, str) or not name:
            raise bad_request(f"tools.{i}.name: Field required")
        schema = tool.get("input_schema")
        if not isinstance(schema, Mapping):
            schema = {"type": "object", "properties": {}}
        elif "$schema" in schema:
            schema = {k: v for k, v in schema.items() if k != "$schema"}
        function: dict[str, Any] = {"name": names.upstream(name)}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        function["parameters"] = schema
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(
    choice: Any, tools: list[dict[str, Any]], names: ToolNames, out: dict[str, Any], warnings: list[str]
) -> None:
    if choice is None or not tools:  # some backends answer 400 to tool_choice without tools
        return
    if not isinstance(choice, Mapping):
        raise bad_request("tool_choice: Input should be an object")
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            raise bad_request("tool_choice.name: Field required")
        upstream = names.upstream(name)
        if not any(t["function"]["name"] == upstream for t in tools):
            warnings.append(f"tool_choice names {name!r}, which is not among the tools sent; ignored")
            return
        out["tool_choice"] = {"type": "function", "function": {"name": upstream}}
    else:
        raise bad_request(f"tool_choice.type: unknown value {kind!r}")
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False


def _thinking(body: Mapping[str, Any], out: dict[str, Any], dialect: Dialect, warnings: list[str]) -> bool:
    """Map ``thinking``/``output_config.effort``; return whether to emit thinking blocks."""
    thinking = body.get("thinking")
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, Mapping) else None
    kind = thinking.get("type") if isinstance(thinking, Mapping) else None
    level: str | None = None
    if isinstance(effort, str):
        if effort in _EFFORTS:
            level = _EFFORTS[effort][dialect == "openai"]
        else:
            warnings.append(f"output_config.effort {effort!r} is unknown; ignored")
    if kind in ("enabled", "adaptive"):
        if dialect == "mistralrs":
            out["enable_thinking"] = True
        budget = thinking.get("budget_tokens") if isinstance(thinking, Mapping) else None
        if level is None and isinstance(budget, int):
            level = "low" if budget < 4096 else "medium" if budget < 16384 else "high"
    elif kind == "disabled":
        if dialect == "mistralrs":
            out["enable_thinking"] = False
        level = None
    elif kind is not None:
        raise bad_request(f"thinking.type: unknown value {kind!r}")
    if level is not None:
        out["reasoning_effort"] = level
    fmt = config.get("format") if isinstance(config, Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), Mapping):
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True},
        }
    display = thinking.get("display") if isinstance(thinking, Mapping) else None
    return kind in ("enabled", "adaptive") and display != "omitted"


def to_openai(
    body: Any,
    *,
    upstream_model: str,
    max_output_tokens: int | None = None,
    dialect: Dialect = "mistralrs",
    mistral_tool_ids: bool = False,
    drop_billing_header: bool = True,
    stream_upstream: bool | None = None,
) -> OpenAIRequest:
    """Translate an Anthropic Messages request body.

    Args:
        body: The parsed client body.
        upstream_model: The model id to send to the node (alias resolution is the caller's).
        max_output_tokens: The backend's output limit; ``max_tokens`` is clamped to it.
        dialect: Which backend extensions to use (see :data:`Dialect`).
        mistral_tool_ids: Map tool-call ids to 9 alphanumerics for Mistral chat templates.
        drop_billing_header: Drop Claude Code's per-session ``x-anthropic-billing-header:``
            system block, which would defeat the node's prefix cache.
        stream_upstream: Whether to ask the node for a stream; ``None`` follows the client.
            Streaming upstream for a non-streaming client lets cortex stop at a stop sequence.

    Returns:
        The OpenAI body and the response-side context.

    Raises:
        AnthropicError: 400 ``invalid_request_error`` for a body that cannot be served.
    """
    if not isinstance(body, Mapping):
        raise bad_request("request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad_request("model: Field required")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise bad_request("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise bad_request("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise bad_request("max_tokens: Input should be greater than or equal to 1")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: at least one message is required")
    if body.get("safeguards") is not None:
        raise bad_request("safeguards: this gateway does not support safeguards; retry without them")
    stops = body.get("stop_sequences")
    stops = [] if stops is None else stops
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop_sequences: Input should be an array of strings")

    warnings: list[str] = []
    names = ToolNames()
    map_id: Callable[[str], str] = mistral_id if mistral_tool_ids else str
    converter = MessageConverter(names, map_id, reasoning_history=dialect == "mistralrs")
    system = system_text(body.get("system"), drop_billing_header=drop_billing_header)
    converter.convert(messages, drop_billing_header=drop_billing_header)
    warnings.extend(converter.warnings)
    system.extend(converter.system)

    out: dict[str, Any] = {"model": upstream_model, "messages": converter.out}
    if system:
        converter.out.insert(0, {"role": "system", "content": "\n".join(system)})
    out["max_tokens"] = min(max_tokens, max_output_tokens) if max_output_tokens else max_tokens
    client_stream = body.get("stream") is True
    if stream_upstream if stream_upstream is not None else client_stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    for key in ("temperature", "top_p") + (("top_k",) if dialect == "mistralrs" else ()):
        value = _number(body, key)
        if value is not None:
            out[key] = value
    tools = _tools(body.get("tools"), names, warnings)
    if tools:
        out["tools"] = tools
    _tool_choice(body.get("tool_choice"), tools, names, out, warnings)
    thinking = _thinking(body, out, dialect, warnings)
    return OpenAIRequest(
        body=out,
        stream=client_stream,
        stop_sequences=tuple(s for s in stops if s),
        thinking=thinking,
        tool_aliases=names.to_client,
        input_tokens_estimate=estimate_input_tokens(body),
        warnings=tuple(warnings),
    )
