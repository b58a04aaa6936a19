"""The CLI's side of the admin API (``status``, ``pin``, ``unpin``, ``load``, ``unload``, ``drain``...).

It is a plain synchronous HTTP client (urllib): a CLI call is one request, and it must work without an
event loop or the console's dependencies. The gateway's address comes from the config's
``gateway.listen`` (a wildcard host becomes loopback) unless ``--gateway`` names one; the admin token, when
configured, is sent as a bearer token. An unreachable gateway is one clear line and exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from cortex.config import Settings, parse_listen

__all__ = ["format_status", "gateway_url", "is_cortex", "run"]


def gateway_url(settings: Settings, override: str | None) -> str:
    """The base URL of the gateway named by the config (or ``--gateway``)."""
    if override:
        return override.rstrip("/")
    host, port = parse_listen(settings.gateway.listen)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class GatewayUnreachable(Exception):
    """The gateway did not answer."""


def _call(
    url: str, token: str, method: str = "GET", body: dict[str, Any] | None = None, timeout: float = 600.0
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read() or b"{}")
        except ValueError:
            payload = {"message": f"HTTP {exc.code}"}
        return exc.code, payload if isinstance(payload, dict) else {"message": str(payload)}
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GatewayUnreachable(f"cannot reach the gateway at {url.split('/admin')[0]}: {reason}") from None


def is_cortex(base: str) -> bool:
    """Whether a cortex gateway answers at ``base`` (its ``/health`` and ``/ready`` shapes)."""
    try:
        with urllib.request.urlopen(base + "/health", timeout=2.0) as resp:
            health = json.loads(resp.read() or b"{}")
    except (OSError, ValueError):
        return False
    if health != {"status": "ok"}:
        return False
    try:
        with urllib.request.urlopen(base + "/ready", timeout=2.0) as resp:
            ready = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:  # 503 while no node is up: still cortex's answer
        try:
            ready = json.loads(exc.read() or b"{}")
        except ValueError:
            return False
    except (OSError, ValueError):
        return False
    return isinstance(ready, dict) and "nodes_up" in ready


def _reload(base: str, token: str) -> int:
    """``cortex reload``: 0 applied, 2 refused (the file is wrong; the gateway keeps its config), 1 otherwise."""
    status, reply = _call(base + "/admin/reload", token, "POST", {}, timeout=60.0)
    message = str(reply.get("message", f"HTTP {status}"))
    if status == 200 and reply.get("ok"):
        print(message)
        for line in reply.get("changes", []):
            print(f"  {line}")
        if reply.get("restart_needed"):
            print(f"restart cortex to apply: {', '.join(reply['restart_needed'])}")
        return 0
    if status == 422:
        print(f"cortex: {message}", file=sys.stderr)
        for line in reply.get("errors", [])[1:]:
            print(line, file=sys.stderr)
        return 2
    print(f"cortex: {message}", file=sys.stderr)
    if status == 401:
        print(
            "cortex: if gateway.admin_token changed, the gateway still has the previous one: "
            "pass that with --token, or send the gateway SIGHUP",
            file=sys.stderr,
        )
    return 1


def run(command: str, args: argparse.Namespace, settings: Settings) -> int:
    """Carry out one admin subcommand; returns the exit code."""
    base = gateway_url(settings, getattr(args, "gateway", None))
    token = getattr(args, "token", None) or settings.gateway.admin_token.get_secret_value()
    try:
        if command == "reload":
            return _reload(base, token)
        if command == "status":
            status, fleet = _call(base + "/admin/fleet", token, timeout=10.0)
            if status != 200:
                print(f"cortex: {fleet.get('message', f'HTTP {status}')}", file=sys.stderr)
                return 1
            print(json.dumps(fleet, indent=2) if args.json else format_status(fleet))
            return 0
        if command in ("pin", "unpin", "load", "unload"):
            model = urllib.parse.quote(args.model, safe="/")
            body: dict[str, Any] = {"node": args.node} if args.node else {}
            if command == "unload":
                body["force"] = bool(args.force)
            status, reply = _call(f"{base}/admin/models/{model}/{command}", token, "POST", body)
        else:
            status, reply = _call(f"{base}/admin/nodes/{urllib.parse.quote(args.node)}/{command}", token, "POST", {})
    except GatewayUnreachable as exc:
        print(f"cortex: {exc}", file=sys.stderr)
        return 1
    message = reply.get("message", f"HTTP {status}")
    if status == 200 and reply.get("ok", False):
        print(message)
        return 0
    print(f"cortex: {message}", file=sys.stderr)
    return 1


def _ago(ts: float, now: float) -> str:
    if not ts:
        return "never"
    secs = max(0, int(now - ts))
    return f"{secs}s ago" if secs < 120 else f"{secs // 60}m ago"


def format_status(fleet: dict[str, Any]) -> str:
    """A plain-text table of nodes and models (what ``cortex status`` prints)."""
    now = time.time()
    lines = [f"gateway {fleet.get('gateway', '?')}  strategy {fleet.get('strategy', '?')}", ""]
    lines.append(f"{'NODE':<14} {'STATUS':<11} {'VRAM used/total MiB':>21} {'IN-FLIGHT':>9} {'CYCLES':>6}  MODELS")
    for node in fleet.get("nodes", []):
        loaded = [s["model_id"] + ("*" if s["pinned"] else "") for s in node["slots"] if s["state"] == "loaded"]
        vram = f"{node['vram_used_mb']}/{node['vram_total_mb']}"
        lines.append(
            f"{node['name']:<14} {node['status']:<11} {vram:>21} {node['in_flight']:>9} {node['cycles']:>6}  "
            + (", ".join(loaded) or "-")
        )
    lines += ["", f"{'MODEL':<44} {'STATE':<9} {'NODES':<24} {'PIN':<3} {'IN-FLIGHT':>9} {'QUEUED':>6}  LAST USED"]
    for model in fleet.get("models", []):
        nodes = ",".join(model["nodes"]) or "-"
        lines.append(
            f"{model['id']:<44} {model['state']:<9} {nodes:<24} {'yes' if model['pinned'] else '':<3} "
            f"{model['in_flight']:>9} {model['queued']:>6}  {_ago(model['last_used'], now)}"
        )
    lines.append("(* pinned)")
    cluster = fleet.get("cluster")
    if cluster:
        lines += ["", _cluster_lines(cluster, now)]
    return "\n".join(lines)


def _cluster_lines(cluster: dict[str, Any], now: float) -> str:
    """The gateways sharing the fleet and who holds each node's lease (``[cluster] redis_url``)."""
    store = "up" if cluster.get("store_up") else "DOWN: read-only (loaded models serve, nothing loads or unloads)"
    lines = [f"cluster store {store}", f"{'GATEWAY':<24} {'ADDRESS':<28} HEARTBEAT"]
    for gateway in cluster.get("gateways", []):
        name = gateway["name"] + (" (this)" if gateway.get("me") else "")
        lines.append(f"{name:<24} {gateway['address']:<28} {_ago(gateway['heartbeat'], now)}")
    lines.append(f"{'NODE':<14} LEASE")
    for lease in cluster.get("leases", []):
        holder = f"{lease['holder']} (token {lease['token']})" if lease.get("holder") else "-"
        lines.append(f"{lease['node']:<14} {holder}")
    return "\n".join(lines)
