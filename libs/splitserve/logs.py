"""Process-wide logging set-up shared by every role: text (default) or one JSON object per line.

Log messages are written as `event: key=value key=value ...` (request_id=... wherever a request is
concerned), so the text form reads well and greps well; the JSON form carries the same keys as
fields, for log pipelines (Loki, Elasticsearch, Cloud Logging). Prompts are left out unless the
gateway runs with --log-prompts.

    SPLITSERVE_LOG_FORMAT=json   (or `splitserve up --log-format json`, which sets it for every role)

Every process sets logging up through `configure` (levels from its --log-level, `add_log_args`).
"""
from __future__ import annotations

import json
import logging
import re
import time

from splitserve.config import env

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_PAIR = re.compile(r"(?<![\w.])([A-Za-z_][\w.]*)=(\S+)")


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "pid", "message", ...key=value pairs of the message...}."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "pid": record.process, "message": message}
        for key, value in _PAIR.findall(message):
            if key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure(level: int | str = logging.INFO, fmt: str | None = None) -> None:
    """The one logging set-up every splitserve process calls (each role's main, `up`, the CLI).

    One handler on the root logger, in `fmt` (default $SPLITSERVE_LOG_FORMAT: text or json); the
    `splitserve` loggers log at `level`, other libraries' loggers (grpc, asyncio, httpx ...) at
    WARNING and above whatever `level` is, so DEBUG shows splitserve's detail, not theirs."""
    fmt = (fmt or str(env.LOG_FORMAT.read())).lower()
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if isinstance(level, str):
        if level.upper() not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
        level = getattr(logging, level.upper())
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))
    logging.getLogger("splitserve").setLevel(level)


def add_log_args(parser, default: str = "INFO") -> None:
    """The --log-level flag every role and `splitserve up` take (the format is SPLITSERVE_LOG_FORMAT)."""
    parser.add_argument("--log-level", default=default, type=str.upper, choices=LEVELS,
                        help=f"level of splitserve's log lines (default: {default})")
