"""The server's log lines: JSON objects (DREAMBOOTH_LOG_FORMAT=json, what pods get) or readable
text, each with the fields its call passed as `extra=` (the model, the error, the seconds)."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

LOG_FORMAT_ENV = "DREAMBOOTH_LOG_FORMAT"
# What every LogRecord has: anything else on a record came from `extra=`.
STANDARD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in STANDARD_FIELDS}


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the extra fields, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage(), **extra_fields(record)}
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextWithFields(logging.Formatter):
    """`time level logger message key=value ...` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{key}={value}" for key, value in extra_fields(record).items())
        line = super().format(record)
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # the fields stay on the message's line
        return f"{head} {fields}{newline}{rest}"


def log_format() -> str:
    """json or text: DREAMBOOTH_LOG_FORMAT, else text in a terminal and json elsewhere."""
    choice = (os.environ.get(LOG_FORMAT_ENV) or "auto").lower()
    if choice == "auto":
        return "text" if sys.stderr.isatty() else "json"
    if choice not in ("json", "text"):
        raise ValueError(f"{LOG_FORMAT_ENV}={choice!r}: expected json, text or auto")
    return choice


def configure_server_logging(fmt: str | None = None) -> None:
    """One handler on the root logger (uvicorn's loggers propagate to it)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if (fmt or log_format()) == "json" else TextWithFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
