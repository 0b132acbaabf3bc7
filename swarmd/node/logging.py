"""Logging: one event per line; JSON when not on a terminal, text otherwise.

Fields bound with `logger.bind(...)` (node, role, peer, request_id, event, ...)
become JSON keys, so a line can be found by `"event": "ready"` whichever
format is in use (text lines carry the bound fields as a JSON tail).
"""

from __future__ import annotations

import json
import sys
import traceback
from datetime import UTC, datetime
from typing import Any, TextIO

from loguru import logger


def _fields(record: Any) -> dict[str, Any]:
    return {k: v for k, v in record["extra"].items() if not k.startswith("_")}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)


def setup_logging(level: str = "INFO", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send every log event to stream (stderr by default) in the chosen format."""
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    logger.remove()

    def sink(message: Any) -> None:
        record = message.record
        fields = _fields(record)
        if use_json:
            doc = {
                "ts": datetime.fromtimestamp(record["time"].timestamp(), UTC).isoformat(
                    timespec="milliseconds"
                ),
                "level": record["level"].name,
                "msg": record["message"],
            }
            doc.update(fields)
            if record["exception"] is not None:
                doc["exception"] = "".join(traceback.format_exception(*record["exception"])).rstrip()
            line = json.dumps(doc, default=_json_default)
        else:
            ts = record["time"].strftime("%H:%M:%S.%f")[:-3]
            line = f"{ts} {record['level'].name:<7} {record['message']}"
            if fields:
                line += " " + json.dumps(fields, default=_json_default)
            if record["exception"] is not None:
                line += "\n" + "".join(traceback.format_exception(*record["exception"])).rstrip()
        out.write(line + "\n")
        out.flush()

    logger.add(sink, level=level.upper(), format="{message}", backtrace=False, diagnose=False)
