"""The HTTP side of `splitserve hf-serve` (Starlette): the OpenAI completions API over a
StaticBatcher. Parsing, sampling parameters, stop handling and incremental detokenization are
splitserve's own (`openai_api`, `OutputStream`), so both servers answer a request the same way."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from splitserve.gateway import openai_api as oa
from splitserve.gateway import openai_responses as answers
from splitserve.bench.hf_batcher import BatchInfo, Job, LoadedModel, RowEnd, StaticBatcher
from splitserve.config.hf_serve import HfServeConfig
from splitserve.gateway.output import OutputStream
from splitserve.gateway.openai_api import ApiError
from splitserve.gateway.request_body import parse_json
from splitserve.sampling_params import SamplingParams
from splitserve.wire import sampling_from_proto

QUEUE_POLL_S = 0.5  # how often a request waiting for its batch checks that its client is still there


class HfServer:
    """The Starlette app over a StaticBatcher."""

    def __init__(self, loaded: LoadedModel, cfg: HfServeConfig, on_ready: Callable[[], None] = lambda: None) -> None:
        self._on_ready = on_ready  # called once warmed up, before serving
        self.m = loaded
        self.cfg = cfg
        self.model_id = loaded.path.name
        self.batcher: StaticBatcher | None = None  # made in the server's event loop (startup)
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_exception}, lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.batcher = StaticBatcher(self.m, self.cfg, asyncio.get_running_loop())
        self.batcher.start()
        try:
            await self._warm_up()
            self._on_ready()
            yield
        finally:
            self.batcher.stop()

    async def _warm_up(self) -> None:
        """One small batch (2 rows of different lengths, 4 tokens) before serving, as bench_engine.py
        warms HF up: the first real batch then does not pay the one-off costs (allocations, kernel
        selection)."""
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        jobs = [Job(self.m.tokenizer.encode(text), params) for text in ("Hello, world.", "Once upon a time, there")]
        for job in jobs:
            self.batcher.submit(job)
        for job in jobs:
            while not isinstance(item := await job.events.get(), (RowEnd, Exception)):
                pass
            if isinstance(item, Exception):
                raise RuntimeError(f"warm-up batch failed: {item}")

    async def _http_exception(self, request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").body(),
                            status_code=exc.status_code)

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> JSONResponse:
        card = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "splitserve-hf",
                "root": str(self.m.path), "max_model_len": self.m.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    def _parse(self, raw: bytes, request_id: str) -> tuple[oa.ParsedRequest, Job]:
        parsed = oa.parse_completion(parse_json(raw), [self.model_id], request_id)
        if parsed.choices[-1].prompt_index > 0:
            raise oa.bad("prompt", "prompt must be one prompt (a string or token ids) on this server",
                         "unsupported_parameter")
        if len(parsed.choices) > 1:
            raise oa.bad("n", "n must be 1 on this server", "unsupported_parameter")
        if parsed.logprobs is not None:
            raise oa.bad("logprobs", "logprobs is not supported by this server", "unsupported_parameter")
        req = parsed.choices[0].request
        params = sampling_from_proto(req.sampling)
        if req.WhichOneof("input") == "prompt":
            ids = self.m.tokenizer.encode(req.prompt)
        else:
            ids = [int(t) for t in req.prompt_token_ids.ids]
            for i, t in enumerate(ids):
                if t >= self.m.vocab_size:
                    raise oa.bad("prompt", f"prompt[{i}] = {t} is outside the vocabulary [0, {self.m.vocab_size})")
        if not ids:
            raise oa.bad("prompt", "prompt tokenizes to no tokens")
        limit = self.m.max_model_len
        if len(ids) >= limit:
            raise oa.bad("prompt", f"prompt is {len(ids)} tokens; the context window (max_model_len) is {limit}, "
                                   "which leaves no room for output")
        if len(ids) + params.max_tokens > limit:
            raise oa.bad("max_tokens", f"max_tokens {params.max_tokens} + {len(ids)} prompt tokens exceeds the "
                                       f"context window (max_model_len) of {limit}")
        return parsed, Job(ids, params)

    async def completions(self, request: Request) -> Response:
        request_id = ""
        try:
            request_id = oa.new_request_id(request.headers.get("x-request-id"))
            parsed, job = self._parse(await request.body(), request_id)
        except ApiError as err:
            return JSONResponse(err.body(), status_code=err.status, headers={"x-request-id": request_id})
        self.batcher.submit(job)
        info = await self._wait_for_batch(job, request)
        if isinstance(info, Exception) or info is None:
            job.closed = True
            if info is None:  # the client left while queued
                return Response(status_code=499)
            err = ApiError(500, str(info), None, "internal_error")
            return JSONResponse(err.body(), status_code=500)
        headers = {"x-request-id": request_id, "x-batch-id": str(info.batch_id), "x-batch-size": str(info.size)}
        out = OutputStream(self.m.tokenizer, job.prompt_ids, job.params, self.m.max_model_len)
        echo = parsed.choices[0].echo_text
        if parsed.stream:
            return StreamingResponse(self._stream(parsed, job, out, echo), media_type="text/event-stream",
                                     headers=headers | {"cache-control": "no-cache"})
        text = echo
        try:
            async for delta in self._deltas(job, out):
                text += delta
        except RuntimeError as exc:
            return JSONResponse(ApiError(500, str(exc), None, "internal_error").body(), status_code=500)
        body = {"id": parsed.response_id, "object": "text_completion", "created": parsed.created,
                "model": parsed.model, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                    "finish_reason": out.finish_reason,
                                                    "stop_reason": _stop_reason(out.stop_reason)}],
                "usage": answers.usage_dict(len(job.prompt_ids), len(out.token_ids), 0)}
        return JSONResponse(body, headers=headers)

    async def _wait_for_batch(self, job: Job, request: Request) -> BatchInfo | Exception | None:
        """The batch's BatchInfo (or its failure); None if the client disconnected while queued."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), QUEUE_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None

    async def _deltas(self, job: Job, out: OutputStream):
        """Text deltas (maybe "") per token until `out` finishes; RuntimeError if the batch failed.
        Closing it (client gone) or a stop string closes the job: the batch stops feeding it."""
        try:
            while not out.finished:
                item = await job.events.get()
                if isinstance(item, Exception):
                    raise RuntimeError(str(item))
                if isinstance(item, RowEnd):  # the thread's checks mirror out's: only a safety net
                    yield out.close(item.reason)
                    break
                yield out.add([item]).text
        finally:
            job.closed = True

    async def _stream(self, parsed: oa.ParsedRequest, job: Job, out: OutputStream, echo: str):
        base = {"id": parsed.response_id, "object": "text_completion", "created": parsed.created,
                "model": parsed.model}
        extra = {"usage": None} if parsed.include_usage else {}
        deltas = self._deltas(job, out)
        try:
            async for text in deltas:
                text, echo = echo + text, ""
                if not text and not out.finished:
                    continue  # held back: a partial character or a possible stop string
                finish = out.finish_reason or None
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                          "stop_reason": _stop_reason(out.stop_reason) if finish else None}
                yield answers.sse(base | {"choices": [choice]} | extra)
            if parsed.include_usage:
                yield answers.sse(base | {"choices": [], "usage": answers.usage_dict(len(job.prompt_ids), len(out.token_ids), 0)})
        except RuntimeError as exc:
            yield answers.sse(ApiError(500, str(exc), None, "internal_error").body())
        finally:
            await deltas.aclose()
        yield answers.sse("[DONE]")


def _stop_reason(value: str) -> str | int | None:
    """OutputStream's stop_reason as vLLM reports it: the stop token id as an int, or the stop string."""
    return int(value) if value.isdigit() else (value or None)


