"""Queries, projections and sorts over JSON documents (the listThings language).

A small MongoDB-style subset, because the seed's users already write queries
this way (`{"info.shelf": 3, "last.online": {"$eq": false}}`) and it needs no
parser: a query is a dict whose keys are dotted field paths or `$and`/`$or`/
`$nor`, whose values are a literal (equality; on a list field, membership) or
a dict of operators. A query is checked once by `compile_query`, which raises
`ValueError` with a sentence naming the bad part, and then matched many times.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Mapping[str, Any]], bool]

_MISSING = object()
MAX_DEPTH = 8  # nesting of $and/$or: bounds recursion on hostile queries
MAX_TERMS = 64  # total field terms in one query


def get_path(doc: Any, path: str) -> Any:
    """The value at a dotted path, or _MISSING when any step is absent."""
    return _get(doc, path.split("."))


def _get(doc: Any, parts: list[str] | tuple[str, ...]) -> Any:
    cur = doc
    for part in parts:
        if isinstance(cur, Mapping) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def _rank(v: Any) -> int:
    # Mongo-like cross-type order: missing/None < numbers < strings < other.
    if v is _MISSING or v is None:
        return 0
    if isinstance(v, bool):
        return 1
    if isinstance(v, (int, float)):
        return 2
    if isinstance(v, str):
        return 3
    return 4


def sort_key(v: Any) -> tuple[int, Any]:
    """A total order over JSON values so a sort never raises on mixed types."""
    r = _rank(v)
    if r == 0:
        return (0, 0)
    if r in (1, 2, 3):
        return (r, v)
    return (r, repr(v))


def _cmp_ok(a: Any, b: Any) -> bool:
    """Comparisons only between values of the same kind (numbers with numbers...)."""
    ra, rb = _rank(a), _rank(b)
    return ra == rb and ra in (1, 2, 3) or (ra in (1, 2) and rb in (1, 2))


def _same(a: Any, b: Any) -> bool:
    # JSON equality: true is not 1, as it is not in the documents' own language.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def _eq(actual: Any, expected: Any) -> bool:
    if actual is _MISSING:
        return expected is None
    if isinstance(actual, list) and not isinstance(expected, list):
        return any(_same(a, expected) for a in actual)
    return _same(actual, expected)


def _term(path: str, op: str, arg: Any) -> Predicate:
    parts = tuple(path.split("."))

    def get_path(d: Any, _path: str) -> Any:  # the path is split once per query, not per document
        return _get(d, parts)

    if op == "$eq":
        return lambda d: _eq(get_path(d, path), arg)
    if op == "$ne":
        return lambda d: not _eq(get_path(d, path), arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if _rank(arg) not in (1, 2, 3):
            raise ValueError(f"{path}: {op} needs a number or a string, got {type(arg).__name__}")

        def cmp(d: Mapping[str, Any]) -> bool:
            v = get_path(d, path)
            values = v if isinstance(v, list) else [v]
            for x in values:
                if not _cmp_ok(x, arg):
                    continue
                if (
                    (op == "$gt" and x > arg)
                    or (op == "$gte" and x >= arg)
                    or (op == "$lt" and x < arg)
                    or (op == "$lte" and x <= arg)
                ):
                    return True
            return False

        return cmp
    if op in ("$in", "$nin"):
        if not isinstance(arg, list):
            raise ValueError(f"{path}: {op} needs a list, got {type(arg).__name__}")
        choices = list(arg)
        if op == "$in":
            return lambda d: any(_eq(get_path(d, path), c) for c in choices)
        return lambda d: not any(_eq(get_path(d, path), c) for c in choices)
    if op == "$exists":
        if not isinstance(arg, bool):
            raise ValueError(f"{path}: $exists needs true or false, got {type(arg).__name__}")
        return lambda d: (get_path(d, path) is not _MISSING) is arg
    if op == "$contains":
        if not isinstance(arg, str):
            raise ValueError(f"{path}: $contains needs a string, got {type(arg).__name__}")
        needle = arg.lower()

        def contains(d: Mapping[str, Any]) -> bool:
            v = get_path(d, path)
            return isinstance(v, str) and needle in v.lower()

        return contains
    raise ValueError(
        f"{path}: unknown operator {op!r}; expected one of $eq $ne $gt $gte $lt $lte $in $nin $exists $contains"
    )


def compile_query(query: Any) -> Predicate:
    """Check a query and turn it into a predicate; ValueError says what is wrong."""
    budget = [MAX_TERMS]
    return _compile(query, 0, budget)


def _compile(query: Any, depth: int, budget: list[int]) -> Predicate:
    if depth > MAX_DEPTH:
        raise ValueError(f"query nests deeper than {MAX_DEPTH} levels")
    if not isinstance(query, Mapping):
        raise ValueError(f"a query must be an object, got {type(query).__name__}")
    preds: list[Predicate] = []
    for key, value in query.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"query keys must be non-empty strings, got {key!r:.40}")
        if key in ("$and", "$or", "$nor"):
            if not isinstance(value, list) or not value:
                raise ValueError(f"{key} needs a non-empty list of queries")
            subs = [_compile(q, depth + 1, budget) for q in value]
            if key == "$and":
                preds.append(lambda d, s=subs: all(p(d) for p in s))
            elif key == "$or":
                preds.append(lambda d, s=subs: any(p(d) for p in s))
            else:
                preds.append(lambda d, s=subs: not any(p(d) for p in s))
            continue
        if key.startswith("$"):
            raise ValueError(f"unknown top-level operator {key!r}; expected $and, $or or $nor, or a field path")
        if isinstance(value, Mapping) and value and all(isinstance(k, str) and k.startswith("$") for k in value):
            ops = value.items()
        else:
            ops = [("$eq", value)]
        for op, arg in ops:
            budget[0] -= 1
            if budget[0] < 0:
                raise ValueError(f"query has more than {MAX_TERMS} terms")
            preds.append(_term(key, op, arg))
    return lambda d: all(p(d) for p in preds)


def compile_projection(fields: Any) -> Callable[[Mapping[str, Any]], dict[str, Any]] | None:
    """`{"a.b": 1, "c": 1}` (include) or `{"x": 0}` (exclude) or a list of paths.

    Returns None for "everything". Mixing include and exclude is refused, as
    in MongoDB, because the intent is ambiguous.
    """
    if fields is None:
        return None
    if isinstance(fields, list):
        if not all(isinstance(f, str) for f in fields):
            raise ValueError("fields as a list must hold field paths (strings)")
        fields = {f: 1 for f in fields}
    if not isinstance(fields, Mapping):
        raise ValueError(f"fields must be an object like {{\"info.title\": 1}} or a list, got {type(fields).__name__}")
    if not fields:
        return None
    modes = set()
    for k, v in fields.items():
        if not isinstance(k, str) or not k or k.startswith("$"):
            raise ValueError(f"field paths must be non-empty strings without '$', got {k!r:.40}")
        if v not in (0, 1) or isinstance(v, float):
            raise ValueError(f"fields.{k} must be 1 (include) or 0 (exclude), got {v!r:.40}")
        modes.add(bool(v))
    if len(modes) > 1:
        raise ValueError("fields mixes include (1) and exclude (0); use one kind")
    include = modes.pop()
    paths = list(fields)

    if include:
        def project(doc: Mapping[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for p in ["id", *paths]:
                v = get_path(doc, p)
                if v is _MISSING:
                    continue
                parts = p.split(".")
                cur = out
                for part in parts[:-1]:
                    nxt = cur.get(part)
                    if not isinstance(nxt, dict):
                        nxt = cur[part] = {}
                    cur = nxt
                cur[parts[-1]] = v
            return out
        return project

    def exclude(doc: Mapping[str, Any]) -> dict[str, Any]:
        out = _deep_copy(doc)
        for p in paths:
            parts = p.split(".")
            cur: Any = out
            for part in parts[:-1]:
                cur = cur.get(part) if isinstance(cur, dict) else None
            if isinstance(cur, dict):
                cur.pop(parts[-1], None)
        return out
    return exclude


def _deep_copy(doc: Any) -> Any:
    if isinstance(doc, Mapping):
        return {k: _deep_copy(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_deep_copy(v) for v in doc]
    return doc


def compile_sort(sort: Any) -> list[tuple[str, bool]]:
    """`{"info.title": 1, "created": -1}` -> [(path, descending)], order kept."""
    if sort is None:
        return []
    if not isinstance(sort, Mapping):
        raise ValueError(f"sort must be an object like {{\"created\": -1}}, got {type(sort).__name__}")
    out = []
    for k, v in sort.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"sort keys must be non-empty field paths, got {k!r:.40}")
        if v not in (1, -1) or isinstance(v, (bool, float)):
            raise ValueError(f"sort.{k} must be 1 (ascending) or -1 (descending), got {v!r:.40}")
        out.append((k, v == -1))
    return out


def apply_sort(docs: list[Mapping[str, Any]], keys: list[tuple[str, bool]]) -> list[Mapping[str, Any]]:
    """Stable multi-key sort: sort by the last key first."""
    out = list(docs)
    for path, desc in reversed(keys):
        out.sort(key=lambda d, p=path: sort_key(get_path(d, p)), reverse=desc)
    return out
