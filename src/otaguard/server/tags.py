"""Inventory names: device tags (``key=value``), group names and tag filters. Pure.

A tag filter is what a dynamic group is made of and what ``fleet list --where`` takes:
``site=berlin,line=2`` means "tag ``site`` is ``berlin`` **and** tag ``line`` is ``2``".
Keys and values use a small alphabet without ``,``, ``=`` and spaces, so a filter has
exactly one reading and travels unquoted through shells, URLs and the database.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final

__all__ = [
    "BUILTIN_GROUP",
    "FILTER_PATTERN",
    "GROUP_NAME_PATTERN",
    "MAX_FILTER_TERMS",
    "MAX_TAGS_PER_DEVICE",
    "TAG_KEY_PATTERN",
    "TAG_VALUE_PATTERN",
    "TagFilter",
    "check_group_name",
    "check_tag_key",
    "format_filter",
    "matches",
    "parse_filter",
    "parse_tag_assignments",
]

#: the group every registered device belongs to; it cannot be created, changed or deleted
BUILTIN_GROUP: Final = "all"
# Tags are labels an operator reads in a listing; more than a few dozen per device is a
# data dump, and every tag is a row the dynamic-group queries scan.
MAX_TAGS_PER_DEVICE: Final = 32
# A filter is a conjunction typed by a person; each term is one subquery.
MAX_FILTER_TERMS: Final = 8
MAX_TAG_KEY: Final = 64
MAX_TAG_VALUE: Final = 128
TAG_KEY_PATTERN: Final = rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_TAG_KEY - 1}}}"
TAG_VALUE_PATTERN: Final = rf"[A-Za-z0-9._:/@+-]{{1,{MAX_TAG_VALUE}}}"
# Group names are path components of the API: the serial alphabet.
GROUP_NAME_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"

#: a whole filter: up to MAX_FILTER_TERMS key=value terms, spaces allowed around each
_TERM: Final = f" *{TAG_KEY_PATTERN}={TAG_VALUE_PATTERN} *"
FILTER_PATTERN: Final = rf"^{_TERM}(,{_TERM}){{0,{MAX_FILTER_TERMS - 1}}}$"

_KEY_RE: Final = re.compile(TAG_KEY_PATTERN)
_VALUE_RE: Final = re.compile(TAG_VALUE_PATTERN)
_GROUP_RE: Final = re.compile(GROUP_NAME_PATTERN)

#: a parsed filter: (key, value) terms, sorted by key, each key once
TagFilter = tuple[tuple[str, str], ...]


def check_tag_key(key: str) -> str:
    """Return ``key`` if it is a valid tag key.

    Raises:
        ValueError: it is not; the message states the rule.
    """
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise ValueError(
            f"invalid tag key {key!r}: use 1-{MAX_TAG_KEY} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return key


def _check_value(key: str, value: str) -> str:
    if not isinstance(value, str) or _VALUE_RE.fullmatch(value) is None:
        raise ValueError(
            f"invalid value {value!r} for tag {key}: use 1-{MAX_TAG_VALUE} letters, digits "
            "or '._:/@+-' (no ',', '=' or spaces)"
        )
    return value


def check_group_name(name: str) -> str:
    """Return ``name`` if it is a valid group name (``all`` is valid: the built-in).

    Raises:
        ValueError: it is not; the message states the rule.
    """
    if not isinstance(name, str) or _GROUP_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid group name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _pairs(items: Iterable[str], *, what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"invalid {what} term {item!r}: expected key=value")
        check_tag_key(key)
        _check_value(key, value)
        if key in pairs and pairs[key] != value:
            raise ValueError(f"tag {key} is given twice with different values")
        pairs[key] = value
    return pairs


def parse_tag_assignments(items: Iterable[str]) -> dict[str, str]:
    """Parse ``key=value`` words (``fleet tag SERIAL site=berlin line=2``).

    Raises:
        ValueError: a word is malformed, or a key is given twice with different values.
    """
    pairs = _pairs(items, what="tag")
    if not pairs:
        raise ValueError("no tags given: expected key=value")
    if len(pairs) > MAX_TAGS_PER_DEVICE:
        raise ValueError(f"a device has at most {MAX_TAGS_PER_DEVICE} tags")
    return pairs


def parse_filter(text: str) -> TagFilter:
    """Parse ``key=value[,key=value...]`` into a canonical filter (sorted by key).

    Raises:
        ValueError: the filter is empty, malformed, too long, or names a key twice with
            different values.
    """
    if not isinstance(text, str) or not text.strip(" "):
        raise ValueError("empty tag filter: expected key=value[,key=value...]")
    terms = [t.strip(" ") for t in text.split(",")]
    if len(terms) > MAX_FILTER_TERMS:
        raise ValueError(f"a tag filter has at most {MAX_FILTER_TERMS} terms")
    return tuple(sorted(_pairs(terms, what="filter").items()))


def format_filter(terms: TagFilter) -> str:
    """The canonical text of a filter (what is stored and shown)."""
    return ",".join(f"{k}={v}" for k, v in terms)


def matches(terms: TagFilter, tags: Mapping[str, str]) -> bool:
    """Whether a device with ``tags`` satisfies every term of the filter."""
    return all(tags.get(k) == v for k, v in terms)
