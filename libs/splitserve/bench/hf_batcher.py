"""The HF transformers model, and the thread that runs it one static batch at a time (`splitserve
hf-serve`; see `splitserve.bench.hf_server`)."""
from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from splitserve.config.hf_serve import HfServeConfig
from splitserve.engine.sampler import Sampler
from splitserve.sampling_params import SamplingParams

log = logging.getLogger("splitserve.hf_server")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    tokenizer: object  # splitserve.model.tokenizer.Tokenizer (the saved fast tokenizer + EOS ids)
    path: Path
    max_model_len: int  # the model's max_position_embeddings
    vocab_size: int  # rows of the embedding table


def load_dense_model(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """HF transformers' model of an HF folder, or of a GGUF file dequantized to dense weights in
    `dtype` (the baseline of `splitserve hf-serve` and `benchmarks/bench_engine.py`), in eval mode."""
    from transformers import AutoModelForCausalLM

    try:  # a plain dense model: some versions otherwise try to keep GGUF weights packed
        from transformers.utils.quantization_config import GgufConfig

        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        dense = {}
    if path.is_dir():
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype, **dense)
    return hf.eval()


def load(model: str | None, dtype: str) -> LoadedModel:
    """The HF model (load_dense_model) and splitserve's tokenizer of the same file."""
    from splitserve.model.loader import resolve_model_path
    from splitserve.model.tokenizer import load_tokenizer

    path = resolve_model_path(model)
    hf = load_dense_model(path, DTYPES[dtype])
    cfg = hf.config
    return LoadedModel(hf, load_tokenizer(path), path, int(cfg.max_position_embeddings), int(cfg.vocab_size))


class BatchInfo(NamedTuple):
    batch_id: int
    size: int
    padded_len: int  # prompt tokens per row after left padding


class RowEnd(NamedTuple):
    reason: str  # "stop" | "length": why the batch thread stopped feeding the row


@dataclass(eq=False)
class Job:
    """One request, shared by its handler (event loop) and the batch thread.

    The batch thread only reads `prompt_ids`, `params`, `closed` and `arrival`, and only writes to
    `events` through the loop (call_soon_threadsafe): BatchInfo once, then token ids (int), then
    RowEnd; or an Exception when the batch failed. `closed` is set by the handler when it wants no
    more tokens (its client left, or a stop string ended the text).
    """

    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    closed: bool = False


class StaticBatcher:
    """Owns the request queue and the thread that runs the model, one batch at a time."""

    def __init__(self, loaded: LoadedModel, cfg: HfServeConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.m = loaded
        self.cfg = cfg
        self._loop = loop
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._sampler = Sampler()
        tok = loaded.tokenizer
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self._eos = loaded.tokenizer.eos_token_ids
        # transformers 5 names the cache argument `cache`, earlier versions `past_key_values`
        forward_args = inspect.signature(loaded.model.forward).parameters
        self._cache_arg = "cache" if "cache" in forward_args else "past_key_values"
        self._num_batches = 0
        self._thread = threading.Thread(target=self._run, name="hf-batch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        while True:
            batch = self._collect()
            if batch is None:
                return
            batch = [j for j in batch if not j.closed]
            if not batch:
                continue
            try:
                with torch.inference_mode():
                    self._generate(batch)
            except Exception as exc:  # the batch fails; the server keeps serving
                log.exception("batch failed: size=%d", len(batch))
                self._send([(j, RuntimeError(f"generation failed: {type(exc).__name__}: {exc}")) for j in batch])

    def _collect(self) -> list[Job] | None:
        """The next batch: the first queued request, then whatever arrives until `batch_wait_ms`
        after that request's arrival (or the batch is full). None: shutting down."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = first.arrival + self.cfg.batch_wait_ms / 1000
        while len(batch) < self.cfg.max_batch_size:
            try:
                wait = deadline - time.monotonic()
                job = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # finish this batch, then stop
                break
            batch.append(job)
        return batch

    def _send(self, items: list[tuple[Job, object]]) -> None:
        """Hands events to the handlers: one wake-up of the event loop per step, not per row."""
        def deliver() -> None:
            for job, item in items:
                job.events.put_nowait(item)
        self._loop.call_soon_threadsafe(deliver)

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        out = self.m.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1, :], getattr(out, self._cache_arg)  # [B, vocab]

    def _generate(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        self._num_batches += 1
        rows = len(batch)
        lens = [len(j.prompt_ids) for j in batch]
        width = max(lens)
        input_ids = torch.full((rows, width), self._pad_id, dtype=torch.long)  # [B, L] left-padded
        attention_mask = torch.zeros((rows, width), dtype=torch.long)  # [B, L] 0 on padding
        for i, job in enumerate(batch):
            input_ids[i, width - lens[i]:] = torch.tensor(job.prompt_ids)
            attention_mask[i, width - lens[i]:] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # [B, L] each row counts from 0
        info = BatchInfo(self._num_batches, rows, width)
        self._send([(j, info) for j in batch])

        params = [j.params for j in batch]
        generators = []
        for p in params:
            gen = None
            if p.seed is not None:
                gen = torch.Generator()
                gen.manual_seed(p.seed)
            generators.append(gen)
        produced = [0] * rows  # tokens each row generated while it was live
        done = [False] * rows
        logits, cache = self._forward(input_ids, attention_mask, position_ids, None)
        next_pos = position_ids[:, -1:] + 1  # [B, 1]
        steps = 0
        while True:
            tokens = self._sampler(logits, params, generators).token_ids
            steps += 1
            events: list[tuple[Job, object]] = []
            for i, job in enumerate(batch):
                if done[i]:
                    tokens[i] = self._pad_id  # a finished row is fed padding, as generate() does
                    continue
                if job.closed:
                    done[i] = True
                    tokens[i] = self._pad_id
                    continue
                produced[i] += 1
                events.append((job, tokens[i]))
                reason = self._finish(job.params, tokens[i], produced[i])
                if reason:
                    done[i] = True
                    events.append((job, RowEnd(reason)))
            if events:
                self._send(events)
            if all(done):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((rows, 1))], dim=1)
            logits, cache = self._forward(torch.tensor(tokens).unsqueeze(1), attention_mask, next_pos, cache)
            next_pos = next_pos + 1
        useful = sum(produced)
        log.info("batch: id=%d size=%d padded_prompt_len=%d steps=%d useful_tokens=%d computed_tokens=%d "
                 "utilization=%.0f%% seconds=%.3f", info.batch_id, rows, width, steps, useful, rows * steps,
                 100.0 * useful / (rows * steps), time.perf_counter() - t0)

    def _finish(self, p: SamplingParams, token: int, n_out: int) -> str:
        """The same checks, in the same order, as OutputStream (which decides what the client sees)."""
        if (not p.ignore_eos and token in self._eos) or token in p.stop_token_ids:
            return "stop"
        return "length" if n_out >= p.max_tokens else ""


