"""`--log-format`: the process's log lines as text, or as one JSON object per line.

A JSON line holds `ts` (ISO 8601, UTC), `level`, `logger` and `message`, plus the record's `fields` when it has
them (access lines: server/api/calls.py) and `exc_info` with a traceback. Only the format changes; `--log-level`
still picks what is logged.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Literal


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(log_format: Literal["text", "json"]) -> None:
    """Put the format on the root logger's handlers (adding one on stderr if logging was not set up)."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if log_format == "json":
        for handler in root.handlers:
            handler.setFormatter(JsonFormatter())
