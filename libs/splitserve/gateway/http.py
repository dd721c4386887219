"""The gateway's HTTP server (Starlette on uvicorn, in the gateway's event loop): the
OpenAI-compatible API, /health and /metrics.

    GET  /v1/models, /v1/models/{model}
    POST /v1/completions, /v1/chat/completions   (stream: server-sent events ending in [DONE])
    GET  /health    200 when at least one prefill and one decode worker answer, else 503; the JSON
                    counts healthy (routable), draining and known workers per role and says whether
                    Redis is ok, degraded or off
    GET  /metrics   Prometheus text format
    GET  /openapi.json  the OpenAPI 3.1 document of all of these (gateway/openapi.py)

Each request runs through the same steps as the gRPC Generate call (GatewayService.admit /
prepare / run), one per choice (`n`, or several prompts), concurrently. Everything that can be
refused is refused before the response starts, with the right status: bad input 400, unknown
model 404, at capacity 429, no worker 503. Errors after streaming began arrive as a final
`data: {"error": ...}` event. The `x-request-id` header names the request in every role's log
(one is generated when absent) and is echoed in the response.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from contextlib import aclosing

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from splitserve import tracing
from splitserve.gateway import openai_api as oa
from splitserve.gateway import openai_responses as answers
from splitserve.gateway.disconnect import ClientDisconnected, until_disconnect
from splitserve.gateway.errors import GatewayError
from splitserve.gateway.openai_api import ApiError
from splitserve.gateway.openapi import openapi_document
from splitserve.gateway.prepare import fill_context
from splitserve.gateway.request_body import parse_json
from splitserve.gateway.service import INTERNAL_MESSAGE

log = logging.getLogger("splitserve.gateway.http")
Code = grpc.StatusCode

_STATUS = {Code.INVALID_ARGUMENT: 400, Code.NOT_FOUND: 404, Code.RESOURCE_EXHAUSTED: 429,
           Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504, Code.UNAUTHENTICATED: 401}
_CODES = {400: "invalid_value", 404: "model_not_found", 429: "rate_limit_exceeded", 503: "service_unavailable",
          504: "timeout", 500: "internal_error"}
# the request fields GatewayError names (gateway/prepare.py) -> the HTTP API's
_PARAMS = {"prompt_token_ids": "prompt", "chat": "messages", "input": "prompt"}


def api_error(exc: GatewayError, kind: str) -> ApiError:
    status = _STATUS.get(exc.code, 500)
    param = exc.field
    message = str(exc) if status != 500 else INTERNAL_MESSAGE
    if param and param.startswith("sampling") and message.startswith("sampling."):
        message = message[len("sampling."):]  # "sampling.max_tokens is 9000 ..." -> "max_tokens is 9000 ..."
        param = message.split(" ", 1)[0]
    param = _PARAMS.get(param, param)
    if kind == "chat" and param == "prompt":
        param = "messages"
    if exc.field and param and param != exc.field and message.startswith(exc.field):
        message = param + message[len(exc.field):]  # "chat is 9031 tokens" -> "messages is 9031 tokens"
    return ApiError(status, message, param, _CODES.get(status))


def error_response(err: ApiError, request_id: str = "") -> JSONResponse:
    headers = {"x-request-id": request_id} if request_id else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class _Stream(StreamingResponse):
    """A streaming response that releases the request's admission slots however it ends
    (finished, client gone, or never started)."""

    def __init__(self, content, release, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class HttpApi:
    """The Starlette app over a GatewayService."""

    def __init__(self, service, max_body_bytes: int = 16 << 20) -> None:
        self.service = service
        self.max_body_bytes = max_body_bytes
        self._tokens: answers.TokenText | None = None
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_exception, Exception: self._internal})

    async def _http_exception(self, request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                   f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=exc.status_code)

    async def _internal(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("http request failed: path=%s", request.url.path)
        return JSONResponse(ApiError(500, INTERNAL_MESSAGE, None, "internal_error").body(), status_code=500)

    # ------------------------------------------------------------------------------ plain GETs
    def _ready_state(self) -> tuple[bool, dict]:
        body: dict = {"status": "ok"}
        ready = self.service.ready
        router = self.service.pool.router
        for role in ("prefill", "decode"):
            workers = router.workers(role) if router is not None else []
            healthy = sum(1 for w in workers if w.routable)
            body[role] = {"healthy": healthy, "draining": sum(1 for w in workers if w.draining),
                          "total": len(workers)}
            ready = ready and healthy > 0
        # Redis only steers routing (prefix hits): while it is down requests are still served by
        # load, so "degraded" is reported but never makes the gateway unready.
        body["redis"] = self.service.owners.status  # "ok" | "degraded" | "off"
        if self.service.draining:  # load balancers stop sending; open requests still finish
            ready, body["status"] = False, "draining"
        elif not ready:
            body["status"] = "unavailable"
        return ready, body

    async def health(self, request: Request) -> JSONResponse:
        ready, body = self._ready_state()
        return JSONResponse(body, status_code=200 if ready else 503)

    async def openapi(self, request: Request) -> JSONResponse:
        """The OpenAPI 3.1 document of this server, with the served model's names and limits."""
        model = self.service.pool.model if self.service.ready else None
        return JSONResponse(openapi_document(self.service.model_names, model, secured=not self.service.authorized(None)))

    async def metrics(self, request: Request) -> Response:
        body = await asyncio.to_thread(self.service.metrics.render)
        return Response(body, media_type=self.service.metrics.content_type)

    def _model_card(self, name: str) -> dict:
        """A model's card: its name, never a filesystem path (`root` is the model file's name, the
        block-hash model id); `created` is when this gateway started, in Unix seconds."""
        model = self.service.pool.model
        return {"id": name, "object": "model", "created": self.service.created, "owned_by": "splitserve",
                "root": model.model_id, "max_model_len": model.max_model_len}

    def _check_key(self, request: Request) -> None:
        if not self.service.authorized(request.headers.get("authorization")):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           None, "invalid_api_key")

    async def models(self, request: Request) -> JSONResponse:
        try:
            self._check_key(request)
        except ApiError as err:
            return error_response(err)
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.service.model_names[:1]]})

    async def model(self, request: Request) -> JSONResponse:
        try:
            self._check_key(request)
        except ApiError as err:
            return error_response(err)
        name = request.path_params["model"]
        if name not in self.service.model_names:
            return error_response(ApiError(404, f"The model '{name[:200]}' does not exist", "model", "model_not_found"))
        return JSONResponse(self._model_card(name))

    # --------------------------------------------------------------------------- generation
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def _generate(self, request: Request, kind: str) -> Response:
        arrival = time.monotonic()
        request_id = ""
        stack = contextlib.ExitStack()
        try:
            self._check_key(request)
            request_id = oa.new_request_id(request.headers.get("x-request-id"))
            tracing.set_incoming(request.headers.get(tracing.TRACEPARENT))  # read by service.run, in this task's context
            raw = await self._body(request)
            self.service.check_open()  # UNAVAILABLE (503) while draining or not yet ready
            parse = oa.parse_completion if kind == "completion" else oa.parse_chat
            body = parse_json(raw, request.headers.get("content-type"))
            parsed = parse(body, self.service.model_names, request_id, self.service.pool.model.max_model_len)
            for _ in parsed.choices:
                stack.enter_context(self.service.admit())
            prepared = [self._fit(c, await self.service.prepare(c.request)) for c in parsed.choices]
        except ApiError as err:
            stack.close()
            self.service.metrics.rejected({404: "unknown_model", 401: "unauthenticated"}.get(err.status, "invalid"))
            return error_response(err, request_id)
        except GatewayError as exc:
            stack.close()
            self.service.rejected(exc.code)
            return error_response(api_error(exc, kind), request_id)
        except ClientDisconnected:  # gone while sending its body: nobody to answer
            self.service.rejected(Code.CANCELLED)
            return Response(status_code=499)
        if self._tokens is None:
            self._tokens = answers.TokenText(self.service.tokenizer)
        headers = {"x-request-id": request_id}
        if parsed.stream:
            return _Stream(self._stream(parsed, prepared, arrival), stack.close, media_type="text/event-stream",
                           headers=headers | {"cache-control": "no-cache"})
        with stack:
            try:  # a client that disconnects cancels the work (gateway/disconnect.py)
                results = await until_disconnect(request.receive, self._collect(parsed, prepared, arrival))
            except GatewayError as exc:
                return error_response(api_error(exc, kind), request_id)
            except ClientDisconnected:
                return Response(status_code=499)  # never delivered: the connection is gone
        return JSONResponse(self._full_response(parsed, results), headers=headers)

    def _fit(self, choice: oa.Choice, prepared):
        """A chat choice without max_tokens generates up to the context's end (vLLM's default)."""
        return fill_context(prepared, self.service.pool.model.max_model_len) if choice.fill_context else prepared

    async def _body(self, request: Request) -> bytes:
        """The body, at most max_body_bytes; beyond that 413. An oversize body is read on and dropped
        (up to 4x the limit, never kept) so the client, still sending, can read the answer."""
        declared = request.headers.get("content-length")
        too_big = bool(declared and declared.isdigit() and int(declared) > self.max_body_bytes)
        if too_big and int(declared) > 4 * self.max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes; at most {self.max_body_bytes} are accepted",
                           None, "request_too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    too_big = True
                    chunks = []
                    if size > 4 * self.max_body_bytes:
                        break
                elif not too_big:
                    chunks.append(chunk)
        except ClientDisconnect:
            raise ClientDisconnected("the client closed the connection while sending the body") from None
        if too_big:
            raise ApiError(413, f"the request body exceeds {self.max_body_bytes} bytes", None, "request_too_large")
        return b"".join(chunks)

    async def _pump(self, index: int, prepared, arrival: float, queue: asyncio.Queue) -> None:
        """Runs one choice, putting (index, response | None at the end | GatewayError) on `queue`."""
        try:
            async with aclosing(self.service.run(prepared, arrival)) as responses:
                async for resp in responses:
                    await queue.put((index, resp))
            await queue.put((index, None))
        except GatewayError as exc:
            self.service.rejected(exc.code)
            await queue.put((index, exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request failed: request_id=%s internal error", prepared.request_id)
            self.service.rejected(Code.INTERNAL)
            await queue.put((index, GatewayError(Code.INTERNAL, "internal gateway error")))

    async def _events(self, prepared: list, arrival: float):
        """(choice index, GenerateResponse) in arrival order across the choices; GatewayError on the
        first failure. Closing it cancels every choice still running."""
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(i, p, arrival, queue)) for i, p in enumerate(prepared)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, GatewayError):
                    raise item
                else:
                    yield index, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, parsed: oa.ParsedRequest, prepared: list, arrival: float) -> list[dict]:
        results = [{"text": c.echo_text, "logprobs": [], "finish_reason": None, "stop_reason": None, "usage": None}
                   for c in parsed.choices]
        async with aclosing(self._events(prepared, arrival)) as events:
            async for index, resp in events:
                r = results[index]
                r["text"] += resp.text
                r["logprobs"].extend(resp.logprobs)
                if resp.finish_reason:
                    r["finish_reason"], r["stop_reason"] = resp.finish_reason, resp.stop_reason or None
                    r["usage"] = resp.usage
        return results

    def _usage(self, parsed: oa.ParsedRequest, usages: list) -> dict:
        """Prompt and cached tokens once per prompt (its first choice), completion tokens of all choices."""
        prompt = cached = completion = 0
        seen: set[int] = set()
        for choice, u in zip(parsed.choices, usages):
            if u is None:
                continue
            completion += u.completion_tokens
            if choice.prompt_index not in seen:
                seen.add(choice.prompt_index)
                prompt += u.prompt_tokens
                cached += u.cached_tokens
        return answers.usage_dict(prompt, completion, cached)

    def _full_response(self, parsed: oa.ParsedRequest, results: list[dict]) -> dict:
        choices = []
        for choice, r in zip(parsed.choices, results):
            if parsed.kind == "completion":
                lps = None
                if parsed.logprobs is not None:
                    lps = answers.completion_logprobs(r["logprobs"], self._tokens, len(choice.echo_text))
                choices.append({"index": choice.index, "text": r["text"], "logprobs": lps,
                                "finish_reason": r["finish_reason"],
                                "stop_reason": answers.stop_reason(r["stop_reason"])})
            else:
                lps = answers.chat_logprobs(r["logprobs"], self._tokens) if parsed.logprobs is not None else None
                choices.append({"index": choice.index, "message": {"role": "assistant", "content": r["text"]},
                                "logprobs": lps, "finish_reason": r["finish_reason"],
                                "stop_reason": answers.stop_reason(r["stop_reason"])})
        return {"id": parsed.response_id, "object": "text_completion" if parsed.kind == "completion" else "chat.completion",
                "created": parsed.created, "model": parsed.model, "choices": choices,
                "usage": self._usage(parsed, [r["usage"] for r in results])}

    async def _stream(self, parsed: oa.ParsedRequest, prepared: list, arrival: float):
        obj = "text_completion" if parsed.kind == "completion" else "chat.completion.chunk"
        base = {"id": parsed.response_id, "object": obj, "created": parsed.created, "model": parsed.model}
        usages: list = [None] * len(parsed.choices)
        started = [False] * len(parsed.choices)
        offsets = [0] * len(parsed.choices)  # completions logprobs: text_offset of the next token
        extra = {"usage": None} if parsed.include_usage else {}
        try:
            if parsed.kind == "chat":  # the role first, as OpenAI does
                for c in parsed.choices:
                    started[c.index] = True
                    yield answers.sse(base | {"choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]} | extra)
            async with aclosing(self._events(prepared, arrival)) as events:
                async for index, resp in events:
                    choice = parsed.choices[index]
                    text = resp.text
                    if parsed.kind == "completion" and not started[index]:
                        started[index] = True
                        text = choice.echo_text + text
                    if resp.finish_reason:
                        usages[index] = resp.usage
                    elif not text and not (resp.logprobs and parsed.logprobs is not None):
                        continue  # text held back (a partial character or a possible stop string)
                    chunk = self._chunk_choice(parsed, choice, text, resp, offsets[index] + len(text) - len(resp.text))
                    offsets[index] += len(text)
                    yield answers.sse(base | {"choices": [chunk]} | extra)
            if parsed.include_usage:
                yield answers.sse(base | {"choices": [], "usage": self._usage(parsed, usages)})
        except GatewayError as exc:
            yield answers.sse(api_error(exc, parsed.kind).body())
        yield answers.sse("[DONE]")

    def _chunk_choice(self, parsed: oa.ParsedRequest, choice: oa.Choice, text: str, resp, offset: int) -> dict:
        finish = resp.finish_reason or None
        stop_reason = answers.stop_reason(resp.stop_reason) if finish else None
        if parsed.kind == "completion":
            lps = None
            if parsed.logprobs is not None:
                lps = answers.completion_logprobs(list(resp.logprobs), self._tokens, offset)
            return {"index": choice.index, "text": text, "logprobs": lps, "finish_reason": finish,
                    "stop_reason": stop_reason}
        lps = answers.chat_logprobs(list(resp.logprobs), self._tokens) if parsed.logprobs is not None else None
        return {"index": choice.index, "delta": {"content": text} if text or not finish else {},
                "logprobs": lps, "finish_reason": finish, "stop_reason": stop_reason}


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the gateway's event loop: the gateway owns the signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """Binds at construction (OSError naming the address when it cannot), serves after start()."""

    def __init__(self, api: HttpApi, host: str, port: int, grace_s: float = 5.0,
                 tls: tuple[str, str] | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # No Nagle on the accepted connections (they inherit it): asyncio only turns it off for
        # sockets made with proto IPPROTO_TCP, so without this a response written in two parts
        # (headers, then body) waited for the client's delayed ACK, 40 ms on every JSON answer.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot bind the HTTP server to {host}:{port}: {e.strerror or e}") from None
        sock.listen(2048)
        sock.setblocking(False)
        self.socket = sock
        self.host = host
        self.port = sock.getsockname()[1]
        self.scheme = "https" if tls else "http"
        config = uvicorn.Config(api.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=grace_s, server_header=False,
                                ssl_certfile=tls[0] if tls else None, ssl_keyfile=tls[1] if tls else None)
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        return f"{self.scheme}://[{host}]:{self.port}" if ":" in host else f"{self.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.socket]), name="http-server")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what startup raised
                raise OSError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops accepting, waits up to grace_s (default: the constructor's) for open responses."""
        if self._task is None:
            self.socket.close()
            return
        if grace_s is not None:
            self._server.config.timeout_graceful_shutdown = grace_s
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.socket.close()
