"""The gateway process: public `splitserve.v1.Gateway/Generate` over grpc.aio, and in the same event
loop the HTTP server (OpenAI-compatible API, /health, /metrics: splitserve/gateway/http.py).

    python -m splitserve.services.gateway.server --prefill H:P[,H:P] --decode H:P[,H:P] [--redis-url URL]

This file only translates: protobuf and gRPC metadata in, calls into splitserve.gateway out
(the request path in gateway/service.py, start-up and shutdown in gateway/app.py), GatewayError
out as a gRPC status. It also holds the process's flags and entry point.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
from contextlib import aclosing

from splitserve import logs, tracing
from splitserve.config import env
from splitserve.config.flags import add_config_args, config_from_args
from splitserve.config.gateway import GatewayConfig
from splitserve.gateway import app
from splitserve.gateway.app import GatewayHandle
from splitserve.gateway.errors import GatewayError
from splitserve.gateway.service import GatewayService
from splitserve.v1 import gateway_pb2_grpc

log = logging.getLogger("splitserve.gateway")

__all__ = ["GatewayHandle", "GatewayService", "GatewayServicer", "add_gateway_args", "build_parser",
           "config_from_namespace", "main", "run_gateway", "serve"]


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Generate over gRPC: the request id may come as x-request-id metadata, the API key as
    "authorization: Bearer KEY" metadata; a GatewayError ends the call with its status."""

    def __init__(self, service: GatewayService) -> None:
        self.service = service

    async def Generate(self, request, context):
        metadata = dict(context.invocation_metadata() or ())
        tracing.set_incoming(metadata.get(tracing.TRACEPARENT))  # a client's trace is continued
        if not request.request_id:
            rid = metadata.get("x-request-id", "")
            if isinstance(rid, str) and rid:
                request.request_id = rid
        responses = self.service.generate(request, metadata.get("authorization"), context.time_remaining())
        try:
            async with aclosing(responses):
                async for response in responses:
                    yield response
        except GatewayError as exc:  # already counted and logged by the service
            await context.abort(exc.code, str(exc))


async def serve(config: GatewayConfig, wait_ready: bool = True) -> GatewayHandle:
    """Starts the gateway on the running event loop; with wait_ready, returns once it is SERVING
    (bounded by config.startup_timeout_s; on failure the server is stopped and the error raised)."""
    return await app.serve(config, GatewayServicer, wait_ready=wait_ready)


async def run_until_signalled(config: GatewayConfig) -> int:
    """Serves until SIGTERM or SIGINT; returns the exit status."""
    return await app.run_until_signalled(config, GatewayServicer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve gateway", description="The splitserve gateway (gRPC and HTTP).")
    add_gateway_args(parser)
    return parser


def add_gateway_args(parser: argparse.ArgumentParser) -> None:
    """The gateway's flags (generated from GatewayConfig, its parts and RouterConfig) and --log-level."""
    add_config_args(parser, GatewayConfig)
    logs.add_log_args(parser)


def config_from_namespace(args: argparse.Namespace) -> GatewayConfig:
    """The config from parsed flags; an empty --api-key takes $SPLITSERVE_API_KEY."""
    return config_from_args(GatewayConfig, args, api_key=args.api_key or str(env.API_KEY.read()))


def run_gateway(args: argparse.Namespace) -> int:
    """Runs the gateway from parsed flags (add_gateway_args) until SIGTERM/SIGINT; the exit status.
    For `splitserve gateway`: the CLI parses, this serves."""
    try:
        config = config_from_namespace(args)
    except ValueError as exc:
        log.error("bad configuration: %s", exc)
        return 2
    try:
        return asyncio.run(run_until_signalled(config))
    except OSError as exc:  # the port is taken
        log.error("%s", exc)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level)
    return run_gateway(args)


if __name__ == "__main__":
    raise SystemExit(main())
