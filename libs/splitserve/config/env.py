"""The environment registry: every SPLITSERVE_* variable splitserve reads, declared once.

Each variable has a type, a default, its allowed values and a docstring; it is read only through
`EnvVar.read()` (no other module touches os.environ for a SPLITSERVE_* name: a test checks), and a
bad value fails loudly with a ValueError that names the variable. An unset or blank variable means
its default. docs/configuration.md lists them (generated from `REGISTRY`'s docstrings).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PREFIX = "SPLITSERVE_"


@dataclass(frozen=True)
class EnvVar:
    name: str
    """The variable's name (SPLITSERVE_...)."""
    kind: type
    """str or int: what read() returns."""
    default: str | int | None
    """What read() returns when the variable is unset or blank."""
    doc: str
    """What the variable does (docs/configuration.md)."""
    choices: tuple[str, ...] = ()
    """The allowed values of a str variable (compared after strip().lower()); empty: any string."""
    minimum: int | None = None
    """The smallest allowed value of an int variable."""
    expected: str = ""
    """What an int variable must be, for the error message ("" : an integer [>= minimum])."""

    def read(self) -> str | int | None:
        """The variable's value; ValueError naming the variable on a value it does not allow."""
        raw = os.environ.get(self.name, "")
        return self.parse(raw)

    def take(self) -> str | int | None:
        """read(), and removes the variable from this process's environment (so children do not
        inherit it)."""
        value = self.read()
        os.environ.pop(self.name, None)
        return value

    def parse(self, raw: str) -> str | int | None:
        text = raw.strip()
        if not text:
            return self.default
        if self.kind is int:
            try:
                number = int(text)
            except ValueError:
                raise ValueError(f"{self.name} must be {self._int_wanted()}, got {raw!r}") from None
            if self.minimum is not None and number < self.minimum:
                raise ValueError(f"{self.name} must be {self._int_wanted()}, got {raw!r}")
            return number
        if self.choices:
            text = text.lower()
            if text not in self.choices:
                wanted = " or ".join(self.choices) if len(self.choices) == 2 else "one of " + ", ".join(self.choices)
                raise ValueError(f"{self.name}={text!r}: expected {wanted}")
        return text

    def _int_wanted(self) -> str:
        if self.expected:
            return self.expected
        return "an integer" if self.minimum is None else f"an integer >= {self.minimum}"


def _declare(*variables: EnvVar) -> dict[str, EnvVar]:
    for v in variables:
        if not v.name.startswith(PREFIX):
            raise ValueError(f"{v.name}: every splitserve variable starts with {PREFIX}")
    return {v.name: v for v in variables}


API_KEY = EnvVar("SPLITSERVE_API_KEY", str, "", (
    "Default API key: the gateway requires it (unless --api-key is given) and `splitserve generate` "
    "and `splitserve bench` send it. Empty: no key."))
LOG_FORMAT = EnvVar("SPLITSERVE_LOG_FORMAT", str, "text", (
    "Log lines of every process: key=value text, or one JSON object per line (`splitserve up "
    "--log-format` sets it for every role)."), choices=("text", "json"))
CACHE_DIR = EnvVar("SPLITSERVE_CACHE_DIR", str, "", (
    "Where derived artifacts (tokenizers converted from GGUF files) are kept; empty: "
    "~/.cache/splitserve."))
CPU_ATTENTION = EnvVar("SPLITSERVE_CPU_ATTENTION", str, "kernel", (
    "CPU attention: the C kernel (when built) or torch's."), choices=("kernel", "torch"))
CPU_ATTENTION_COPY = EnvVar("SPLITSERVE_CPU_ATTENTION_COPY", str, "best", (
    "The copy of the CPU attention kernel: best (avx512 where the CPU has AVX-512F and DQ, else avx2), or "
    "one of those (the same bits; to compare, or to rule one out)."), choices=("best", "avx2", "avx512"))
FP8_MM = EnvVar("SPLITSERVE_FP8_MM", str, "on", (
    "FP8 weights on a GPU with FP8 tensor cores (compute capability 8.9+): W8A8 GEMMs (kernels/fp8_mm.py), "
    "or the weight-only tile path (off)."), choices=("on", "off"))
TRITON_QUANT = EnvVar("SPLITSERVE_TRITON_QUANT", str, "on", (
    "GPTQ/AWQ weights on a CUDA device: a Triton GEMM straight from the packed words (kernels/triton_quant.py), "
    "or the tile path (off: a dequantized tile of W at a time, then a float GEMM)."), choices=("on", "off"))
CPU_OPS = EnvVar("SPLITSERVE_CPU_OPS", str, "kernel", (
    "CPU small ops (norms, rotary, activation): the C kernels (when built) or torch's."),
    choices=("kernel", "torch"))
CPU_QUANT = EnvVar("SPLITSERVE_CPU_QUANT", str, "kernel", (
    "Quantized (Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K) weights of a float32 CPU model: kept only as their GGUF blocks and "
    "computed from them (kernel, when built), or off: dequantized to float32 copies at load (the "
    "float32 GEMM, ~4x the memory)."), choices=("kernel", "off"))
CPU_QUANT_ROWS = EnvVar("SPLITSERVE_CPU_QUANT_ROWS", int, 48, (
    "Up to how many rows of activations the quantized kernel runs; above, a float32 GEMM over weight "
    "tiles dequantized from the blocks does (0: that GEMM always)."), minimum=0)
CPU_INT8 = EnvVar("SPLITSERVE_CPU_INT8", str, "best", (
    "The copy of the int8 matmul kernel a CPU model runs: best (what this CPU has: amx for 13 rows and "
    "more, else avx512vnni (16 weight rows a vector for 3 rows and more of Q4_0, Q4_1, Q4_K, Q5_K), "
    "avxvnni or avx2), or one of those this CPU runs (the same bits, to compare or to rule one out; a "
    "Zen 4 has avx512vnni but not avxvnni)."), choices=("best", "avx2", "avxvnni", "avx512vnni", "amx"))
CPU_LAYERS = EnvVar("SPLITSERVE_CPU_LAYERS", str, "kernel", (
    "Decode steps of a quantized float32 CPU model: every layer in one C call (kernel, when built) or "
    "layer by layer in torch (the same bits; to compare, or to rule it out)."), choices=("kernel", "torch"))
CPU_GEMM = EnvVar("SPLITSERVE_CPU_GEMM", str, "onednn", (
    "The float32 CPU GEMM: onednn, mkl or plain (torch.mm); a backend this torch build lacks falls to "
    "the next one in that order."), choices=("onednn", "mkl", "plain"))
MALLOC_ARENAS = EnvVar("SPLITSERVE_MALLOC_ARENAS", int, 1, (
    "glibc malloc arenas of a worker process (splitserve.heap): 1 keeps its gRPC threads from each "
    "holding freed memory in an arena of its own; 0 leaves glibc's default (8 per core)."), minimum=0)
PARENT_PID = EnvVar("SPLITSERVE_PARENT_PID", int, None, (
    "Set by `splitserve up` for its children: the launcher's pid; the child dies with it. Removed "
    "from the environment once read. Not for users."), minimum=1, expected="a process id")

REGISTRY: dict[str, EnvVar] = _declare(API_KEY, LOG_FORMAT, CACHE_DIR, CPU_ATTENTION, CPU_ATTENTION_COPY, CPU_OPS, CPU_QUANT, FP8_MM,
                                       TRITON_QUANT, CPU_QUANT_ROWS, CPU_INT8, CPU_LAYERS, CPU_GEMM, MALLOC_ARENAS,
                                       PARENT_PID)


def read(name: str) -> str | int | None:
    """The value of the registered variable `name`; KeyError for a name not in the registry."""
    try:
        variable = REGISTRY[name]
    except KeyError:
        raise KeyError(f"{name} is not a registered splitserve variable (config/env.py)") from None
    return variable.read()


def check() -> None:
    """Reads every registered variable: ValueError naming the first one set to a value it refuses
    (the CLI checks this first, so `splitserve up` fails before it starts a process)."""
    for variable in REGISTRY.values():
        variable.read()


def cache_dir() -> Path:
    """Where derived artifacts are kept: $SPLITSERVE_CACHE_DIR or ~/.cache/splitserve (created)."""
    raw = str(CACHE_DIR.read())
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "splitserve"
    path.mkdir(parents=True, exist_ok=True)
    return path


def markdown_table() -> str:
    """The registry as a Markdown table (docs/configuration.md)."""
    rows = ["| Variable | Type | Default | Allowed | What it does |", "|---|---|---|---|---|"]
    for v in REGISTRY.values():
        allowed = ", ".join(v.choices) if v.choices else (f">= {v.minimum}" if v.minimum is not None else "any")
        default = repr(v.default) if v.default != "" else "(empty)"
        rows.append(f"| `{v.name}` | {v.kind.__name__} | {default} | {allowed} | {v.doc} |")
    return "\n".join(rows)
