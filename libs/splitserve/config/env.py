"""The environment variables splitserve reads (SPLITSERVE_*)."""
from __future__ import annotations

import os


def env_setting(name: str) -> str:
    """A SPLITSERVE_* setting from the environment ("" when unset): SPLITSERVE_LOG_FORMAT,
    SPLITSERVE_API_KEY. Env is read here and in env_overrides/cache_dir only."""
    if not name.startswith("SPLITSERVE_"):
        raise ValueError(f"not a splitserve setting: {name}")
    return os.environ.get(name, "")


def cache_dir() -> "os.PathLike[str]":
    """Where derived artifacts (converted tokenizers) are kept: $SPLITSERVE_CACHE_DIR or ~/.cache/splitserve."""
    from pathlib import Path

    raw = os.environ.get("SPLITSERVE_CACHE_DIR")
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "splitserve"
    path.mkdir(parents=True, exist_ok=True)
    return path
