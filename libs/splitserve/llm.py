"""The offline API, in the shape vLLM users know: `LLM(...).generate(prompts, sampling_params)`."""
from __future__ import annotations


import itertools
from dataclasses import dataclass, field, fields
from typing import Sequence, Union

from splitserve.config.engine import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampler import TokenLogprobs
from splitserve.sampling_params import SamplingParams

PromptType = Union[str, list[int]]


@dataclass
class RequestOutput:
    """The finished result of one prompt."""

    request_id: str
    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" or "length"
    stop_reason: int | str | None = None  # the stop token id or stop string, None for EOS/length
    logprobs: list[TokenLogprobs] | None = None  # one per generated token, when asked for
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache


class LLM:
    """A model with its engine in this process.

    `LLM()` loads the default model (SmolLM2-135M-Instruct Q4_1); `model` may be a GGUF file or a
    Hugging Face checkpoint folder; `dtype` is "auto" (float32 on a CPU without native bfloat16,
    bfloat16 on one with it and on CUDA: `config.engine.resolve_dtype`), float32, bfloat16 or float16
    (CUDA). Other keyword arguments are EngineConfig fields
    (kv_cache_memory_gb, block_size, max_num_seqs, max_num_batched_tokens, max_model_len, device, ...).
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, dtype=dtype, **kwargs))
        self.config = self.engine.config  # dtype "auto" resolved by the engine
        self._ids = itertools.count()

    def with_config(self, **overrides) -> "LLM":
        """A new LLM with its own KV cache and scheduler, sharing this one's weights and tokenizer.

        `overrides` are cache and scheduler fields (kv_cache_memory_gb, max_num_seqs, ...)."""
        new = object.__new__(LLM)
        mc = self.config.model  # every model field, so that the engines' ModelConfigs are equal
        new.engine = LLMEngine(EngineConfig.from_kwargs(
            **{f.name: getattr(mc, f.name) for f in fields(mc)}, **overrides
        ), share_weights_with=self.engine)
        new.config = new.engine.config
        new._ids = itertools.count()
        return new

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (strings or token-id lists) in one continuous batch."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
        token_lists: list[list[int]] = []
        texts: list[str | None] = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:
                    raise ValueError(f"prompts[{i}] is an empty string")
                token_lists.append(self.tokenizer.encode(p))
                texts.append(p)
            elif isinstance(p, (list, tuple)):
                token_lists.append(list(p))
                texts.append(None)
            else:
                raise ValueError(f"prompts[{i}] must be a string or a list of token ids, got {type(p).__name__}")
        return self._run(token_lists, texts, sampling_params)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        if not conversations:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        token_lists = [self.tokenizer.apply_chat_template(c) for c in conversations]
        return self._run(token_lists, [None] * len(token_lists), sampling_params)

    def _run(self, token_lists, texts, sampling_params) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(token_lists)
        else:
            params = list(sampling_params)
            if len(params) != len(token_lists):
                raise ValueError(
                    f"sampling_params has {len(params)} entries for {len(token_lists)} prompts"
                )
        for i, ids in enumerate(token_lists):  # validate all before adding any
            try:
                self.engine.validate_prompt(ids)
            except ValueError as exc:
                raise ValueError(f"prompts[{i}]: {exc}") from None
        outputs: dict[str, RequestOutput] = {}
        order = []
        for ids, text, p in zip(token_lists, texts, params):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, ids, p)
            outputs[rid] = RequestOutput(rid, text, list(ids), logprobs=[] if p.logprobs is not None else None)
            order.append(rid)
        try:
            while self.engine.has_unfinished():
                for delta in self.engine.step():
                    out = outputs[delta.request_id]
                    out.token_ids.extend(delta.new_token_ids)
                    out.text += delta.new_text
                    if out.logprobs is not None:
                        out.logprobs.extend(delta.new_logprobs)
                    if delta.finished:
                        out.finish_reason = delta.finish_reason
                        out.stop_reason = delta.stop_reason
                        out.num_cached_tokens = delta.num_cached_tokens
        except BaseException:
            for rid in order:  # an interrupted call leaves nothing running behind
                self.engine.abort_request(rid)
            raise
        return [outputs[r] for r in order]
