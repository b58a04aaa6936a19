"""The fast front's header-block reader (``header_pairs``) against a plain line-by-line reading of RFC 9110.

The fast front takes a request only when every header line is well formed; anything else goes to aiohttp's
parser. A line the reader accepted wrongly would reach a handler with headers aiohttp would have refused, so
the compiled pattern and the rule it stands for must agree on every block, hostile ones included.
"""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from cortex.proxy.fast import header_pairs

TCHAR = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F))


def reference(block: str) -> list[tuple[str, str]] | None:
    """RFC 9110 field lines, one at a time: ``token ":" OWS value OWS CRLF``, value of VCHAR, SP and HTAB."""
    if not block:
        return []
    if not block.endswith("\r\n"):
        return None
    pairs = []
    for line in block[:-2].split("\r\n"):
        if "\r" in line or "\n" in line:
            return None
        name, colon, value = line.partition(":")
        if not colon or not name or any(c not in TCHAR for c in name):
            return None
        value = value.strip(" \t")
        if any(c not in VISIBLE and c not in " \t" for c in value):
            return None
        pairs.append((name, value))
    return pairs


def test_usual_heads() -> None:
    block = "Host: 127.0.0.1:8000\r\nContent-Type: application/json\r\nX-Pad:  \t a \t b \t \r\nEmpty:\r\n"
    assert header_pairs(block) == [
        ("Host", "127.0.0.1:8000"),
        ("Content-Type", "application/json"),
        ("X-Pad", "a \t b"),
        ("Empty", ""),
    ]
    assert header_pairs("") == []


def test_what_goes_to_aiohttp() -> None:
    bad = {
        "obsolete fold": "A: b\r\n c\r\n",
        "bare LF inside": "A: b\nC: d\r\n",
        "bare CR inside": "A: b\rC: d\r\n",
        "LF-only line end": "A: b\n",
        "space in the name": "Bad Name: x\r\n",
        "space before the colon": "A : x\r\n",
        "no colon": "Just text\r\n",
        "empty name": ": x\r\n",
        "control character": "A: b\x01c\r\n",
        "DEL": "A: b\x7f\r\n",
        "no final line end": "A: b",
    }
    for name, block in bad.items():
        assert header_pairs(block) is None, name
        assert reference(block) is None, name


_pieces = st.sampled_from(
    ["Host", "X-A", "content-length", "a b", "", ":", " ", "\t", "v", "1 2", "\r\n", "\n", "\r", "\x00", "\x7f", "é"]
)


_ends = st.sampled_from(["\r\n", "\r\n", "\r\n", "\n", "\r", "\r\n ", "\r\n\t", "\n\r"])


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.lists(_pieces, max_size=6).map("".join), _ends), max_size=5))
def test_the_pattern_reads_as_the_rule_does(lines: list[tuple[str, str]]) -> None:
    block = "".join(line + end for line, end in lines)
    assert header_pairs(block) == reference(block)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(TCHAR + " ", min_size=0, max_size=8), st.text(VISIBLE + " \t\x01", max_size=12)),
        max_size=5,
    )
)
def test_names_and_values(fields: list[tuple[str, str]]) -> None:
    block = "".join(f"{name}:{value}\r\n" for name, value in fields)
    assert header_pairs(block) == reference(block)
