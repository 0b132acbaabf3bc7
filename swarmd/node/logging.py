"""Logging: one event per line; JSON when not on a terminal, text otherwise.

Fields bound with `logger.bind(...)` (node, role, peer, request_id, event, ...)
become JSON keys, so a line can be found by `"event": "ready"` whichever
format is in use (text lines carry the bound fields as a JSON tail).

The sink runs once per log event in every role, including the gateway's
access line per request, so it is kept cheap: orjson instead of json (with
json.dumps's layout), the UTC timestamp's seconds part formatted once per
second, and no intermediate dict when no field is private.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from typing import Any, TextIO

import orjson
from loguru import logger


def _fields(record: Any) -> dict[str, Any]:
    extra = record["extra"]
    for k in extra:
        if k.startswith("_"):
            return {k: v for k, v in extra.items() if not k.startswith("_")}
    return extra


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    return str(obj)


_OPTS = orjson.OPT_NON_STR_KEYS | orjson.OPT_INDENT_2
_INDENT = re.compile(rb"\n *")


def _dumps(doc: dict[str, Any]) -> str:
    """json.dumps(doc) text (", " and ": " between items, so a line can be found by
    `"event": "ready"`), written by orjson.

    orjson's indented form already separates keys with ": "; a newline occurs in it
    only between items (inside strings it is escaped), so joining the lines back,
    keeping a space after each comma, gives json.dumps's layout. What orjson refuses
    (ints beyond 64 bits) goes to json.dumps.
    """
    try:
        raw = orjson.dumps(doc, default=_json_default, option=_OPTS)
    except TypeError:
        return json.dumps(doc, default=_json_default, ensure_ascii=False)
    return _INDENT.sub(b"", raw.replace(b",\n", b", \n")).decode()


class _UtcStamp:
    """ISO-8601 UTC timestamps with milliseconds; the part up to the second is reused within a second."""

    __slots__ = ("_sec", "_prefix")

    def __init__(self) -> None:
        self._sec = -1
        self._prefix = ""

    def __call__(self, ts: float) -> str:
        sec = int(ts)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{int((ts - sec) * 1000):03d}+00:00"


def setup_logging(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send every log event to stream (stderr by default) in the chosen format."""
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    logger.remove()
    stamp = _UtcStamp()
    write, flush = out.write, out.flush

    def sink(message: Any) -> None:
        record = message.record
        fields = _fields(record)
        exc = record["exception"]
        if use_json:
            doc = {"ts": stamp(record["time"].timestamp()), "level": record["level"].name, "msg": record["message"]}
            doc.update(fields)
            if exc is not None:
                doc["exception"] = "".join(traceback.format_exception(*exc)).rstrip()
            line = _dumps(doc)
        else:
            ts = record["time"].strftime("%H:%M:%S.%f")[:-3]
            line = f"{ts} {record['level'].name:<7} {record['message']}"
            if fields:
                line += " " + _dumps(fields)
            if exc is not None:
                line += "\n" + "".join(traceback.format_exception(*exc)).rstrip()
        write(line + "\n")
        flush()

    logger.add(sink, level=level.upper(), format="{message}", backtrace=False, diagnose=False)
    logger.enable("swarmd")  # the package is silent as a library (swarmd/__init__.py); this is the application
