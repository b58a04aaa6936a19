"""``GET /v1/models`` serialised once per fleet change, not once per request.

With 64 nodes listing 32 models each the merged list has 2,048 entries (about 400 KB of JSON). Building it
from a fresh fleet snapshot on every request cost ~9 ms of the loop per call (p95 ~30 ms), and clients
and dashboards poll it. What the list shows changes only when a node lists or drops a model, a slot
changes state, a pin or a load starts or ends, a node reports a model's kind, or a reload changes the
models' facts; polls that find nothing new change none of these. So :class:`Catalogue` keeps the
serialised bytes with a key made of exactly those inputs (:meth:`Catalogue.key`: a counter the fleet
bumps, plus the identity or contents of the few collections a reload replaces) and rebuilds only when
the key differs. A request then costs a key comparison and a write of bytes already made.

The answers carry a strong ``ETag`` (a digest of the bytes), so a poller that sends ``If-None-Match``
gets a ``304`` with no body while nothing changed. The Anthropic shape is paged by the client's query:
the last few pages asked for are kept per catalogue key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from cortex.proxy.anthropic.models import models_list

if TYPE_CHECKING:
    from cortex.engine.engine import Engine

__all__ = ["Catalogue", "Page"]

_PAGES_KEPT = 16
"""Distinct Anthropic pages (query strings) kept per catalogue version."""


class Page:
    """One serialised answer: the JSON bytes and their ``ETag``."""

    __slots__ = ("body", "etag")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'

    def matches(self, if_none_match: str | None) -> bool:
        """Whether a request's ``If-None-Match`` names this answer (a ``304`` will do)."""
        if not if_none_match:
            return False
        if if_none_match.strip() == "*":
            return True
        return any(tag.strip().removeprefix("W/") == self.etag for tag in if_none_match.split(","))


class Catalogue:
    """The merged model list of one engine, in both dialects, rebuilt only when the fleet changed it.

    Args:
        engine: The engine whose fleet is listed.
        build: Makes the OpenAI-shape payload (``models_payload``); called on a change only.
    """

    def __init__(self, engine: Engine, build: Callable[[Engine], dict[str, Any]]) -> None:
        self._engine = engine
        self._build = build
        self._key: tuple[Any, ...] | None = None
        self._openai: Page | None = None
        self._served: list[str] = []
        self._pages: dict[tuple[str | None, str | None, str | None], Page] = {}
        self.builds = 0
        """How many times the list was built (each fleet change that it shows; read by tests)."""

    def key(self) -> tuple[Any, ...]:
        """What the list depends on, cheap to take and to compare.

        A tuple compares its items by identity first, so an unchanged collection costs one pointer
        comparison; one a reload replaced is compared by content (equal content, same list).
        """
        fleet = self._engine.fleet
        return (
            fleet.catalogue_rev,
            fleet.nodes_by_model(),  # a new dict whenever a node or a model comes or goes
            fleet.facts,  # replaced by a reload: aliases
            tuple(fleet.loading),  # "loading" until loaded
            tuple(fleet.pins.values()),  # set_pin bumps the counter; a reload replaces the sets
            tuple(item for item in self._engine.kinds.by_node.items() if item[1]),  # replaced when learned
        )

    def _fresh(self) -> None:
        key = self.key()
        if key == self._key and self._openai is not None:
            return
        fleet = self._engine.fleet
        fleet.touch()  # the snapshot behind the list must be built from the records as they are now
        self._openai = Page(orjson.dumps(self._build(self._engine)))
        self._served = sorted(fleet.nodes_by_model())
        self._pages = {}
        self._key = key
        self.builds += 1

    def openai(self) -> Page:
        """The OpenAI-shape list (``{"object": "list", "data": [...]}``)."""
        self._fresh()
        assert self._openai is not None
        return self._openai

    def served(self) -> list[str]:
        """Every model id some node lists, sorted (a copy)."""
        self._fresh()
        return list(self._served)

    def anthropic(self, query: Mapping[str, str]) -> Page:
        """One page of the Anthropic-shape list for the client's ``after_id``/``before_id``/``limit``.

        Raises:
            AnthropicError: 400 for a limit out of range.
        """
        self._fresh()
        slot = (query.get("after_id"), query.get("before_id"), query.get("limit"))
        page = self._pages.get(slot)
        if page is None:
            limit = slot[2]
            payload = models_list(
                self._served,
                after_id=slot[0],
                before_id=slot[1],
                limit=int(limit) if limit and limit.isdigit() else None,
            )
            page = Page(orjson.dumps(payload))
            if len(self._pages) >= _PAGES_KEPT:
                self._pages.pop(next(iter(self._pages)))
            self._pages[slot] = page
        return page
