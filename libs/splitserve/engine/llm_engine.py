"""The engine loop: requests in, one scheduled model step at a time, token deltas out.

Owns one model, one KV cache, one block manager and one scheduler; single-threaded (the services
drive `step()` from one thread). A request is validated in `add_request` with errors naming the
argument; once accepted it always ends with a finish reason ("stop", "length" or "abort").
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field, replace

import torch

from splitserve.config.engine import QUANTIZED_MATMUL_AUTO, EngineConfig
from splitserve.engine.block_manager import BlockManager
from splitserve.engine.detokenizer import IncrementalDetokenizer, apply_stop_rules
from splitserve.engine.hashing import hash_namespace
from splitserve.transfer.block import BlockHeader
from splitserve.transfer.pages import PageImport, PinnedExport, blocks_to_export, import_blocks, read_blocks
from splitserve.engine.kv_cache import KV_TORCH_DTYPES, KVCache
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.sampler import Sampler, TokenLogprobs
from splitserve.engine.scheduler import Scheduler
from splitserve.engine.sequence import Sequence, check_token_ids
from splitserve.engine.speculative import SpeculativeDecoder
from splitserve.model.loader import TORCH_DTYPES, load_model, resolve_model_dtype
from splitserve.model.tokenizer import LazyTokenizer
from splitserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one step produced for one request (a delta; `finished` marks the last one)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # Requests added with export_blocks=True, in their last output only:
    exported_blocks: list[tuple[BlockHeader, bytes]] = field(default_factory=list)  # full prompt blocks, less export_skip
    pinned_export: PinnedExport | None = None  # the same blocks left in their pages, with pin_export=True
    prompt_block_hashes: list[bytes] = field(default_factory=list)  # every full prompt block, exported or not
    rng_state: bytes = b""  # the seeded generator's state after the last token
    # time.monotonic() stamps, for the workers' latency metrics (no extra work: the engine keeps them):
    arrival_time: float = 0.0  # the request reached the engine (EngineLoop: when a server thread handed it over)
    first_scheduled_time: float = 0.0  # the start of its first engine step
    first_token_time: float = 0.0  # the first token this engine produced for it
    token_time: float = 0.0  # when this output's token was produced (end of its step's sampling)


@dataclass
class EngineStats:
    """Cumulative counters (the metrics layer reads them)."""

    prompt_tokens: int = 0  # prompt tokens computed (a prefix-cache hit's tokens are not)
    generation_tokens: int = 0  # tokens sampled
    num_steps: int = 0
    max_batch_size: int = 0  # most sequences one step has run
    last_batch_size: int = 0  # sequences of the latest step


class LLMEngine:
    def __init__(self, config: EngineConfig, share_weights_with: "LLMEngine | None" = None) -> None:
        """Loads the model (or reuses the weights and tokenizer of an engine with the same ModelConfig)."""
        t0 = time.monotonic()
        # "auto" becomes a concrete dtype here, once: everything after (the model, the KV cache and
        # its block headers, the workers' reports of self.config) sees the resolved value.
        dtype_name, why = resolve_model_dtype(config.model.dtype, config.model.device, config.model.model)
        if dtype_name != config.model.dtype:
            logger.info("dtype %s -> %s: %s", config.model.dtype, dtype_name, why)
            config = replace(config, model=replace(config.model, dtype=dtype_name))
        self.config = config
        mc, cc = config.model, config.cache
        if share_weights_with is not None:
            if share_weights_with.config.model != mc:
                raise ValueError("share_weights_with: the other engine has a different ModelConfig")
            self.model, self.model_path = share_weights_with.model, share_weights_with.model_path
            self._tokenizer = share_weights_with._tokenizer
        else:
            self.model, self.model_path = load_model(mc.model, mc.dtype, mc.device, mc.max_model_len, mc.quantization)
            self._tokenizer = LazyTokenizer(self.model_path)
        self.eos_token_ids = self._tokenizer.eos_token_ids
        self.quantized_matmul = QUANTIZED_MATMUL_AUTO if mc.quantized_matmul == "auto" else mc.quantized_matmul
        self.model.set_quantized_matmul(self.quantized_matmul)
        if getattr(self.model, "int8_copy", None):
            logger.info("quantized_matmul %sint8, kernel copy %s", "auto -> " if mc.quantized_matmul == "auto" else "",
                        self.model.int8_copy)
        elif mc.quantized_matmul == "auto" and self.model.fused_decode is not None:
            logger.info("quantized_matmul auto -> %s", self.quantized_matmul)
        args = self.model.args
        self.model_id = self.model_path.name
        dtype = KV_TORCH_DTYPES[mc.dtype if cc.kv_cache_dtype == "auto" else cc.kv_cache_dtype]
        num_blocks = KVCache.num_blocks_for_budget(
            cc.kv_cache_memory_gb, args.num_layers, args.num_kv_heads, args.head_dim, cc.block_size, dtype
        )
        self.kv_cache = KVCache(args.num_layers, args.num_kv_heads, args.head_dim, cc.block_size, num_blocks, dtype, mc.device)
        self.block_manager = BlockManager(num_blocks, cc.block_size, cc.enable_prefix_caching,
                                          copy_tokens=self.kv_cache.copy_tokens)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.runner = ModelRunner(self.model, self.kv_cache, self.block_manager, config.triton_enabled)
        self.sampler = Sampler()
        # A sequence never needs more than the whole pool, nor more than the model's positions.
        limits = [mc.max_model_len or args.max_position_embeddings, num_blocks * cc.block_size]
        if args.sliding_window:
            limits.append(args.sliding_window)  # within the window, sliding attention is full attention
        self.max_model_len = min(limits)
        self.stats = EngineStats()
        self.spec = self._speculative_decoder(config)
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._namespaces: dict[str | None, bytes] = {}
        # How a pinned export's release (any thread) reaches this engine's thread: EngineLoop sets it;
        # None runs it at once (a caller on the engine's own thread)
        self.defer: Callable[[Callable[[], None]], object] | None = None
        logger.info(
            "engine ready: model=%s dtype=%s kv_cache_dtype=%s blocks=%d x %d tokens (%.1f MiB) max_model_len=%d "
            "in %.1fs", self.model_id, mc.dtype, self.kv_cache.dtype_name, num_blocks, cc.block_size,
            num_blocks * self.kv_cache.bytes_per_block / 2**20, self.max_model_len, time.monotonic() - t0,
        )

    @property
    def tokenizer(self):
        """The model's tokenizer, built on first use (a served worker never asks: model.tokenizer.LazyTokenizer)."""
        return self._tokenizer.get()

    def _speculative_decoder(self, config: EngineConfig) -> SpeculativeDecoder | None:
        spec = config.speculative
        if spec is None:
            return None
        draft = None
        if spec.method == "draft_model":
            from splitserve.engine.draft_model import DraftModel

            draft = DraftModel(spec, self)
        logger.info("speculative decoding: %s, up to %d tokens a step", spec.method, spec.num_speculative_tokens)
        return SpeculativeDecoder(spec, draft)

    # ----------------------------------------------------------------------- requests
    def namespace(self, cache_salt: str | None = None) -> bytes:
        if cache_salt not in self._namespaces:
            self._namespaces[cache_salt] = hash_namespace(self.model_id, cache_salt)
        return self._namespaces[cache_salt]

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt is empty: give at least one token")
        check_token_ids("prompt_token_ids", prompt_token_ids, self.model.args.vocab_size)
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(prompt_token_ids)} tokens; the context window (max_model_len) is "
                f"{self.max_model_len}, which leaves no room for output"
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        *,
        output_token_ids: list[int] | None = None,
        detokenize: bool = True,
        export_blocks: bool = False,
        export_skip: Container[bytes] = (),
        pin_export: bool = False,
        rng_state: bytes | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queues a request. `output_token_ids` continues a generation begun elsewhere (the first
        token from a prefill worker, or a stream being resumed); `detokenize=False` leaves text and
        stop strings to the caller (the gateway); `export_blocks` returns the prompt's full KV blocks
        with the last output, less those whose hash is in `export_skip` (blocks the kvstore already
        holds: copying them out would be wasted); with `pin_export` they stay in their pages, pinned,
        as the output's `pinned_export`, which the caller releases (any thread: PinnedExport);
        `rng_state` continues a seeded generator from that state; `arrival_time` (time.monotonic())
        is when the request arrived, if earlier than now (queue-time metrics)."""
        if request_id in self._seqs:
            raise ValueError(f"request_id {request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        self.validate_prompt(prompt_token_ids)
        outputs = list(output_token_ids or ())
        check_token_ids("output_token_ids", outputs, self.model.args.vocab_size)
        if len(prompt_token_ids) + len(outputs) >= self.max_model_len:
            raise ValueError(f"prompt plus output ({len(prompt_token_ids) + len(outputs)} tokens) fills the "
                             f"context window (max_model_len {self.max_model_len})")
        if len(outputs) >= params.max_tokens:
            raise ValueError(f"output_token_ids already holds {len(outputs)} tokens, max_tokens is {params.max_tokens}")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
            if rng_state:
                try:
                    generator.set_state(torch.frombuffer(bytearray(rng_state), dtype=torch.uint8))
                except RuntimeError as exc:
                    raise ValueError(f"rng_state is not a valid generator state: {exc}") from None
        seq = Sequence(
            request_id, prompt_token_ids, params, self.config.cache.block_size, self.namespace(cache_salt), generator
        )
        for t in outputs:
            seq.append_token(t)
        seq.export_blocks = export_blocks
        seq.export_skip = export_skip
        seq.pin_export = pin_export
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        self._seqs[request_id] = seq
        if detokenize:
            self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params)
        self.scheduler.add(seq)

    # ----------------------------------------------------------------------- KV blocks
    def num_local_prefix_blocks(self, block_hashes: list[bytes]) -> int:
        """Leading blocks of `block_hashes` this engine's prefix cache holds now."""
        n = 0
        for h in block_hashes:
            if self.block_manager.lookup(h) is None:
                break
            n += 1
        return n

    def import_blocks(self, blocks: list[tuple[BlockHeader, bytes]]) -> int:
        """Received blocks into free pages of the prefix cache, in order, up to the first that is
        invalid or finds no page; returns how many leading blocks are now cached
        (splitserve.transfer.pages.import_blocks)."""
        return import_blocks(self.block_manager, self.kv_cache, self.model_id, blocks)

    def begin_import(self, block_hashes: list[bytes]) -> PageImport:
        """Pages for blocks to be fetched straight into them, in order, up to the first that finds
        none (splitserve.transfer.pages.PageImport: place them, then finish on this thread)."""
        return PageImport(self.kv_cache, self.block_manager, self.model_id, block_hashes, self.defer)

    def _export(self, seq: Sequence) -> tuple[list[tuple[BlockHeader, bytes]], PinnedExport | None, list[bytes]]:
        """(the computed full blocks of the prompt not in seq.export_skip read out, or [] and the same
        blocks pinned (seq.pin_export); the hashes of all of them). Before the sequence's blocks are freed."""
        selected, hashes = blocks_to_export(seq.block_hashes, seq.num_prompt_tokens, seq.num_computed_tokens,
                                            self.config.cache.block_size, seq.export_skip)
        table = self.block_manager.block_table(seq.seq_id)
        if seq.pin_export:
            pinned = PinnedExport(self.kv_cache, self.block_manager, table, selected, self.model_id, self.defer)
            return [], pinned, hashes
        return read_blocks(self.kv_cache, table, selected, self.model_id), None, hashes

    def abort_request(self, request_id: str) -> bool:
        """Ends a request at once and frees its blocks; False if it is unknown or already done."""
        seq = self._seqs.get(request_id)
        if seq is None:
            self._detok.pop(request_id, None)
            return False
        self._end(seq, "abort")
        return True

    def _end(self, seq: Sequence, reason: str) -> None:
        """Finishes a sequence: frees its blocks and forgets it (the draft model's state too)."""
        self.scheduler.finish(seq, reason)
        self._seqs.pop(seq.seq_id, None)
        self._detok.pop(seq.seq_id, None)
        if self.spec is not None:
            self.spec.forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self._seqs)

    # ----------------------------------------------------------------------- one step
    def step(self) -> list[StepOutput]:
        if self.spec is not None:
            self.spec.propose(self.scheduler.running, self.max_model_len,
                              self.config.scheduler.max_num_batched_tokens)
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        now = time.monotonic()
        logits, sampled_idx, rows = self.runner.execute(sched.scheduled)
        if self.spec is not None:
            self.spec.observe_step(sched.scheduled, time.monotonic() - now)
        for seq, n in sched.scheduled:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            n -= len(seq.draft_token_ids)  # proposals are computed, but not the sequence's until verified
            self.stats.prompt_tokens += max(0, min(n, seq.num_prompt_tokens - seq.num_computed_tokens))
            seq.num_computed_tokens += n
            self.block_manager.cache_full_blocks(seq.seq_id, seq.block_hashes, seq.num_computed_tokens,
                                                 seq.token_ids)
        self.stats.num_steps += 1
        self.stats.last_batch_size = len(sched.scheduled)
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(sched.scheduled))
        if not sampled_idx:
            return []
        token_time = time.monotonic()  # one clock read per step, shared by its tokens
        seqs = [sched.scheduled[i].seq for i in sampled_idx]
        offsets = [0]
        for r in rows:
            offsets.append(offsets[-1] + r)
        plain = [i for i, r in enumerate(rows) if r == 1]
        emitted: dict[int, tuple[list[int], list]] = {}
        if plain:  # one batched draw for every sequence without proposals
            # every row plain (no proposals this step): the logits as they are, not a copy of them
            picked = logits if len(plain) == len(rows) else logits[[offsets[i] for i in plain]]
            out = self.sampler(picked, [seqs[i].params for i in plain],
                               [seqs[i].generator for i in plain])
            for i, token, lp in zip(plain, out.token_ids, out.logprobs):
                emitted[i] = ([token], [lp])
        for i, seq in enumerate(seqs):
            if rows[i] > 1:
                v = self.sampler.verify(logits[offsets[i]: offsets[i + 1]], seq.params, seq.generator,
                                        seq.draft_token_ids, seq.draft_probs)
                self.spec.record(seq, rows[i] - 1, v.num_accepted)
                emitted[i] = (v.token_ids, v.logprobs)
        results = []
        for i, seq in enumerate(seqs):
            tokens, lps = emitted[i]
            results.append(self._append(seq, tokens, lps, token_time))
            self.stats.generation_tokens += len(results[-1].new_token_ids)
        return results

    def _append(self, seq: Sequence, tokens: list[int], lps: list[TokenLogprobs | None],
                token_time: float) -> StepOutput:
        """Appends a step's tokens to the sequence (one, or accepted proposals and one more), each
        through the stop rules: a stop inside an accepted run ends the output right there."""
        params = seq.params
        detok = self._detok.get(seq.seq_id)  # None: the caller detokenizes
        had_drafts = bool(seq.draft_token_ids)
        seq.clear_drafts()
        if seq.first_token_time is None:
            seq.first_token_time = token_time
        texts, new_ids, new_lps = [], [], []
        reason = stop_reason = None
        for j, (token, lp) in enumerate(zip(tokens, lps)):
            seq.append_token(token)
            new_ids.append(token)
            if lp is not None:
                seq.logprobs.append(lp)
                new_lps.append(lp)
            text, reason, stop_reason = apply_stop_rules(token, params, self.eos_token_ids, detok,
                                                         seq.num_output_tokens, seq.num_tokens, self.max_model_len)
            texts.append(text)
            if reason is not None:
                break
            if j < len(tokens) - 1:  # an accepted proposal: its K/V were computed by this step
                seq.num_computed_tokens += 1
        if reason is None and had_drafts:
            self.block_manager.cache_full_blocks(seq.seq_id, seq.block_hashes, seq.num_computed_tokens,
                                                 seq.token_ids)
            self.block_manager.trim(seq.seq_id, seq.num_computed_tokens)  # slots of rejected proposals
        exported, pinned, prompt_hashes, rng_state = [], None, [], b""
        if reason is not None:
            seq.stop_reason = stop_reason
            if seq.export_blocks:
                exported, pinned, prompt_hashes = self._export(seq)
                if seq.generator is not None:
                    rng_state = seq.generator.get_state().numpy().tobytes()
            self._end(seq, reason)
        return StepOutput(
            request_id=seq.seq_id,
            new_token_ids=new_ids,
            new_text="".join(texts),
            new_logprobs=new_lps,
            finished=reason is not None,
            finish_reason=reason,
            stop_reason=stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            exported_blocks=exported,
            pinned_export=pinned,
            prompt_block_hashes=prompt_hashes,
            rng_state=rng_state,
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time or 0.0,
            first_token_time=seq.first_token_time,
            token_time=token_time,
        )
