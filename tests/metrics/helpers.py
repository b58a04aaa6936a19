"""Scraping cortex's ``/metrics`` over HTTP, reading it with prometheus-client's parser, and promtool."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]
SeriesKey = tuple[str, Labels]

MIB = 1024 * 1024


def labels(**kv: str) -> Labels:
    return frozenset(kv.items())


@dataclass
class Scrape:
    """One scrape: the raw text, each sample by (name, labels), and the family types."""

    text: str
    samples: dict[SeriesKey, float]
    types: dict[str, str]

    def series(self, name: str) -> dict[Labels, float]:
        """Every sample called ``name`` (a sample name: ``..._total``, ``..._bucket``, ``..._count``)."""
        return {lab: v for (n, lab), v in self.samples.items() if n == name}

    def value(self, name: str, **kv: str) -> float:
        return self.samples[(name, labels(**kv))]

    def names(self) -> set[str]:
        """Every series name a query can use, including those of families with no sample yet."""
        out = {n for n, _ in self.samples}
        for family, kind in self.types.items():
            if kind == "counter":
                out.add(family + "_total")
            elif kind == "histogram":
                out.update({family + "_bucket", family + "_sum", family + "_count"})
            else:
                out.add(family)
        return out


def parse(text: str) -> Scrape:
    samples: dict[SeriesKey, float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return Scrape(text, samples, types)


async def scrape(http: aiohttp.ClientSession, addr: tuple[str, int] | None) -> Scrape:
    assert addr is not None, "the gateway has no metrics_listen"
    host, port = addr
    async with http.get(f"http://{host}:{port}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(await resp.text())


def counts_by(series: dict[Labels, float], keys: Iterable[str]) -> dict[tuple[str, ...], float]:
    """Sum a series' values by some of its labels."""
    keys = tuple(keys)
    out: dict[tuple[str, ...], float] = {}
    for lab, value in series.items():
        d = dict(lab)
        k = tuple(d[x] for x in keys)
        out[k] = out.get(k, 0.0) + value
    return out


def promtool_check(text: str) -> None:
    """``promtool check metrics`` on ``text``: skipped without promtool, except in CI where it must exist."""
    exe = shutil.which("promtool")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (Debian's `prometheus` package; .ci/run installs it)")
        pytest.skip("promtool not installed (install Debian's `prometheus` package); CI runs this check")
    proc = subprocess.run([exe, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30, check=False)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, f"promtool check metrics failed:\n{out}"
    assert out.strip() == "", f"promtool reported problems:\n{out}"


async def wait_until(predicate: object, limit_s: float = 5.0, what: str = "condition") -> None:
    """Poll a zero-argument callable until it returns true (bounded)."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
