"""Engine configuration: frozen dataclasses, one docstring per field, validated on construction.

`EngineConfig` is built once per process from the shared sub-configs; derived values are properties.
Environment variables are read in one place, `env_overrides`, which fails loudly on bad values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None
    """GGUF file or Hugging Face checkpoint folder; None loads the default SmolLM2-135M-Instruct Q4_1."""
    dtype: str = "bfloat16"
    """Compute and KV-cache dtype: float32 or bfloat16 on the CPU; float16 or bfloat16 on CUDA."""
    device: str = "cpu"
    """Torch device the weights and the KV cache live on ("cpu" or "cuda")."""
    max_model_len: int | None = None
    """Longest prompt + output a sequence may have, in tokens; None takes the model's context length."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device.startswith("cpu") and self.dtype == "float16":
            raise ValueError("dtype 'float16' is not supported on the CPU; use 'float32' or 'bfloat16'")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block; also the unit of prefix-cache hashing and of block transfer."""
    kv_cache_memory_gb: float = 1.0
    """Memory budget of the paged KV cache in GiB (all layers, K and V); the pool never grows past it."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of full prompt blocks seen before (chained block hashes)."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most sequences in one step's batch (running sequences, prefill chunks included)."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: decode tokens plus prefill chunk tokens."""
    long_prefill_token_threshold: int = 0
    """Longest prefill chunk one sequence gets in a step (0: up to the whole budget)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which model and how to run it."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The paged KV cache."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Continuous batching limits."""
    use_triton: bool | None = None
    """Triton kernels for KV writes and decode attention; None: on when the device is CUDA."""

    @property
    def triton_enabled(self) -> bool:
        if self.use_triton is None:
            return self.model.device.startswith("cuda")
        return self.use_triton

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        """Builds the config from flat keyword arguments (the `LLM(...)` surface); unknown names fail."""
        parts = {}
        for name, sub in (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig)):
            names = {f.name for f in fields(sub)}
            parts[name] = sub(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        use_triton = kwargs.pop("use_triton", None)
        if kwargs:
            raise TypeError(f"unknown engine argument(s): {', '.join(sorted(kwargs))}")
        return cls(**parts, use_triton=use_triton)


def env_overrides() -> dict:
    """The engine settings taken from the environment (SPLITSERVE_*); the only place env is read."""
    out: dict = {}
    if "SPLITSERVE_MODEL" in os.environ:
        out["model"] = os.environ["SPLITSERVE_MODEL"]
    if "SPLITSERVE_KV_CACHE_MEMORY_GB" in os.environ:
        raw = os.environ["SPLITSERVE_KV_CACHE_MEMORY_GB"]
        try:
            out["kv_cache_memory_gb"] = float(raw)
        except ValueError:
            raise ValueError(f"SPLITSERVE_KV_CACHE_MEMORY_GB must be a number, got {raw!r}") from None
    return out


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


# ------------------------------------------------------------------------------------ CLI flags
# Flags are generated from the config dataclasses: a field `kv_cache_memory_gb` becomes
# `--kv-cache-memory-gb`, its docstring the help text, its default the flag's default.


def _field_docs(cls) -> dict[str, str]:
    """Field docstrings (the string literal right after each field) read from the class source."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


def add_config_args(parser, cls, skip: tuple[str, ...] = ()) -> None:
    """Adds one `--flag` per field of the frozen dataclass `cls` (bool fields get --x/--no-x)."""
    import argparse
    import typing

    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not f.default_factory else f.default_factory()  # type: ignore[misc]
        hint = hints[f.name]
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kind = base[0]
        help_text = docs.get(f.name, "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif kind in (int, float, str):
            parser.add_argument(flag, type=kind, default=default, help=help_text + f" (default: {default})")
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no CLI flag for type {hint}")


def config_from_args(cls, args, **overrides):
    """Builds `cls` from an argparse namespace filled by add_config_args (validation runs)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def parse_cpu_list(spec: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8] (the Linux cpu-list format of taskset and cgroups); every core
    must be one this process may run on. ValueError names what is wrong."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"cpu list {spec!r}: {part!r} is not a core number or a range like 0-3") from None
        if first < 0 or last < first:
            raise ValueError(f"cpu list {spec!r}: {part!r} is not a range of core numbers")
        cpus.update(range(first, last + 1))
    allowed = available_cpus()
    outside = sorted(cpus - set(allowed))
    if outside:
        raise ValueError(f"cpu list {spec!r}: core(s) {outside} are not available to this process "
                         f"(available: {format_cpu_list(allowed)})")
    return sorted(cpus)


def available_cpus() -> list[int]:
    """The cores this process may run on (all of os.cpu_count() where affinity is not supported)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def format_cpu_list(cpus) -> str:
    """[0, 1, 2, 3, 8] -> '0-3,8'."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def pin_process(cpus: list[int]) -> None:
    """Confines every thread of this process (and the threads it starts later) to `cpus`.
    Call it before the model loads, so torch's thread pool starts on those cores."""
    if not hasattr(os, "sched_setaffinity"):
        raise OSError("pinning to cores needs Linux (os.sched_setaffinity)")
    os.sched_setaffinity(0, cpus)
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return
    for tid in tasks:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # the thread ended meanwhile
            pass
