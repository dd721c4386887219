"""splitserve: LLM serving with disaggregated prefill and decode over a paged KV cache.

The offline API: `from splitserve import LLM, SamplingParams`.
"""
from splitserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the model code: import it only when asked for.
    if name in ("LLM", "RequestOutput"):
        from splitserve import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
