"""gRPC helpers shared by every role: servers, channels, health and reflection.

Every server and channel carries the same message-size limits (KV blocks travel in chunks of about
1 MiB, so the 16 MiB default leaves ample headroom). Health follows the standard grpc.health.v1
protocol so load balancers, Kubernetes probes and `grpc_health_probe` work unchanged.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 16 * MiB


def size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    if max_message_bytes < 1:
        raise ValueError(f"max_message_bytes must be >= 1, got {max_message_bytes}")
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def format_address(host: str, port: int) -> str:
    """host:port, with brackets around an IPv6 literal."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _bind(server, host: str, port: int) -> int:
    """Binds (insecure) host:port on a sync or aio server; the bound port, or OSError naming it."""
    address = format_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:  # newer grpcio raises instead of returning 0
        raise OSError(f"cannot bind gRPC server to {address}: {e}") from None
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return bound


# so_reuseport off: gRPC turns SO_REUSEPORT on by default on Linux, which lets a second server
# bind a port that is already serving and silently split its traffic; we want a loud failure.
_NO_REUSEPORT = [("grpc.so_reuseport", 0)]


def create_server(
    host: str, port: int, max_workers: int = 16, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[grpc.Server, int]:
    """A sync gRPC server bound (insecure) to host:port, not started yet, and the bound port.

    port 0 picks a free port. Raises OSError naming the address when it cannot be bound.
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=size_options(max_message_bytes) + _NO_REUSEPORT,
    )
    return server, _bind(server, host, port)


def create_aio_server(
    host: str, port: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> tuple[grpc.aio.Server, int]:
    """The grpc.aio counterpart of create_server (the gateway's event loop)."""
    server = grpc.aio.server(options=size_options(max_message_bytes) + _NO_REUSEPORT)
    return server, _bind(server, host, port)


def add_health_and_reflection(server: grpc.Server, service_full_names: list[str]) -> health.HealthServicer:
    """Registers grpc.health.v1 (SERVING for "" and each service) and server reflection.

    Returns the HealthServicer so the caller can flip services to NOT_SERVING on shutdown.
    """
    servicer = health.HealthServicer()
    for name in ["", *service_full_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        [*service_full_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer


async def add_aio_health_and_reflection(
    server: grpc.aio.Server, service_full_names: list[str]
) -> health.aio.HealthServicer:
    """grpc.health.v1 (NOT_SERVING for "" and each service until the caller sets SERVING) and reflection."""
    servicer = health.aio.HealthServicer()
    for name in ["", *service_full_names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        [*service_full_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer


def channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
            extra_options: tuple[tuple[str, int | str], ...] = ()) -> grpc.Channel:
    """An insecure client channel with the same message-size limits as the servers."""
    return grpc.insecure_channel(address, options=size_options(max_message_bytes) + list(extra_options))


# While waiting for a server to come up, reconnect quickly: gRPC's default backoff after a refused
# connection starts at 1 s and grows, which would add seconds to every startup.
_FAST_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                   ("grpc.max_reconnect_backoff_ms", 250))


def wait_until_serving(address: str, timeout_s: float, service: str = "") -> None:
    """Polls the health service at `address` until `service` is SERVING.

    Raises TimeoutError naming the address (and the last status or error) after timeout_s seconds.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with channel(address, extra_options=_FAST_RECONNECT) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"gRPC server at {address} not SERVING after {timeout_s:g} s ({last})")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service),
                                   timeout=min(remaining, 1.0))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = f"status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
