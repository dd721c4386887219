"""The config of `splitserve hf-serve`, the HF transformers static-batching baseline of the benchmarks."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class HfServeConfig:
    model: str | None = None
    """GGUF file or HF checkpoint folder; None: splitserve's default model."""
    dtype: str = "float32"
    """Weights and compute dtype (float32 | bfloat16)."""
    host: str = "127.0.0.1"
    port: int = 8001
    """0 picks a free port (the log line 'hf-serve listening' names it)."""
    max_batch_size: int = 32
    """Most requests in one static batch."""
    batch_wait_ms: float = 50.0
    """After the first queued request arrived, wait this long for more before starting a batch."""
    threads: int | None = None
    """torch intra-op threads; None: torch's default."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms:g}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
