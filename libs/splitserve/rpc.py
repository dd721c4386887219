"""gRPC helpers shared by every role: servers, channels, health and reflection.

Every server and channel carries the same message-size limits (KV blocks travel in chunks of about
1 MiB, so the 16 MiB default leaves ample headroom). Health follows the standard grpc.health.v1
protocol so load balancers, Kubernetes probes and `grpc_health_probe` work unchanged.
"""
from __future__ import annotations

import inspect
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
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


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the TLS {what} {path}: {e.strerror or e}") from None
    if not data.strip():
        raise ValueError(f"the TLS {what} {path} is empty")
    return data


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """TLS for a server from PEM files; with client_ca_file, clients must present a certificate
    signed by that CA (mutual TLS). ValueError naming the file that cannot be read."""
    if not cert_file or not key_file:
        raise ValueError("TLS needs both a certificate file and a key file")
    pair = [(_read(key_file, "key"), _read(cert_file, "certificate"))]
    if client_ca_file:
        return grpc.ssl_server_credentials(pair, root_certificates=_read(client_ca_file, "client CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def channel_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """TLS for a client channel: trust `ca_file` (default: the system roots), and present
    cert_file/key_file when the server asks for a client certificate (mutual TLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA") if ca_file else None,
        private_key=_read(key_file, "key") if key_file else None,
        certificate_chain=_read(cert_file, "certificate") if cert_file else None)


def check_mtls_files(ca_file: str, cert_file: str, key_file: str) -> None:
    """ValueError unless the three mutual-TLS files are all given or all empty."""
    given = [bool(ca_file), bool(cert_file), bool(key_file)]
    if any(given) and not all(given):
        raise ValueError("mutual TLS between roles needs tls_ca_file, tls_cert_file and tls_key_file together")


def mtls_credentials(ca_file: str, cert_file: str, key_file: str):
    """(server credentials, channel credentials) for mutual TLS between roles: this process's
    certificate and key, and the CA that signed every role's certificate (servers require client
    certificates from it, channels trust it). (None, None) when the files are not given."""
    check_mtls_files(ca_file, cert_file, key_file)
    if not ca_file:
        return None, None
    return (server_credentials(cert_file, key_file, client_ca_file=ca_file),
            channel_credentials(ca_file, cert_file, key_file))


def _bind(server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    """Binds host:port (TLS with `credentials`) on a sync or aio server; the bound port, or OSError
    naming it."""
    address = format_address(host, port)
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError as e:  # newer grpcio raises instead of returning 0
        raise OSError(f"cannot bind gRPC server to {address}: {e}") from None
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return bound


# so_reuseport off: gRPC turns SO_REUSEPORT on by default on Linux, which lets a second server
# bind a port that is already serving and silently split its traffic; we want a loud failure.
_NO_REUSEPORT = [("grpc.so_reuseport", 0)]


def create_server(
    host: str, port: int, max_workers: int = 16, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ServerCredentials | None = None, interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, int]:
    """A sync gRPC server bound (insecure) to host:port, not started yet, and the bound port.

    port 0 picks a free port. Raises OSError naming the address when it cannot be bound.
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=size_options(max_message_bytes) + _NO_REUSEPORT, interceptors=list(interceptors) or None,
    )
    return server, _bind(server, host, port, credentials)


def create_aio_server(
    host: str, port: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """The grpc.aio counterpart of create_server (the gateway's event loop); TLS with `credentials`."""
    server = grpc.aio.server(options=size_options(max_message_bytes) + _NO_REUSEPORT)
    return server, _bind(server, host, port, credentials)


def _parse(cls, raw: bytes):
    """`raw` parsed as a `cls` message; ValueError naming the message when it is not one."""
    try:
        return cls.FromString(raw)
    except (DecodeError, RuntimeWarning, ValueError) as e:
        raise ValueError(f"the request is not a valid {cls.DESCRIPTOR.full_name} message "
                         f"(malformed protobuf or invalid UTF-8 in a string field): {e}") from None


def add_servicer(servicer, service_descriptor, server) -> None:
    """Registers `servicer` for `service_descriptor` (e.g. `kvstore_pb2.DESCRIPTOR.services_by_name
    ["KVStore"]`) on a sync server, like the generated add_*Servicer_to_server, except that requests
    are parsed inside the handler: one that is not a valid message (bad wire format, invalid UTF-8
    in a string field) is INVALID_ARGUMENT naming the message, where grpcio answers INTERNAL."""
    handlers = {}
    for method in service_descriptor.methods:
        req_cls = message_factory.GetMessageClass(method.input_type)
        resp_cls = message_factory.GetMessageClass(method.output_type)
        impl = _implementation(servicer, method.name)
        if impl is None:
            continue
        make = _SYNC_HANDLERS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(impl, req_cls, resp_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers),))


def _implementation(servicer, name: str):
    """The servicer's method `name`, or None when it has none of its own: missing, or the generated
    base class's stub (grpc.health.v1 List in grpcio's health servicers). Unregistered, such a method
    answers UNIMPLEMENTED without the stub's logged exception on every call (a log a client could flood)."""
    impl = getattr(servicer, name, None)
    owner = next((c for c in type(servicer).__mro__ if name in vars(c)), None)
    if impl is None or (owner is not None and owner.__module__.endswith("_pb2_grpc")):
        return None
    return impl


def _sync_parse(cls, raw, context):
    try:
        return _parse(cls, raw)
    except ValueError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


def _unary_unary(impl, cls, serialize):
    return grpc.unary_unary_rpc_method_handler(lambda raw, ctx: impl(_sync_parse(cls, raw, ctx), ctx),
                                               response_serializer=serialize)


def _unary_stream(impl, cls, serialize):
    def handler(raw, ctx):
        yield from impl(_sync_parse(cls, raw, ctx), ctx)
    return grpc.unary_stream_rpc_method_handler(handler, response_serializer=serialize)


def _stream_unary(impl, cls, serialize):
    return grpc.stream_unary_rpc_method_handler(
        lambda raws, ctx: impl((_sync_parse(cls, raw, ctx) for raw in raws), ctx), response_serializer=serialize)


def _stream_stream(impl, cls, serialize):
    def handler(raws, ctx):
        yield from impl((_sync_parse(cls, raw, ctx) for raw in raws), ctx)
    return grpc.stream_stream_rpc_method_handler(handler, response_serializer=serialize)


_SYNC_HANDLERS = {(False, False): _unary_unary, (False, True): _unary_stream, (True, False): _stream_unary,
                  (True, True): _stream_stream}


def add_aio_servicer(servicer, service_descriptor, server: grpc.aio.Server) -> None:
    """add_servicer for a grpc.aio server (unary requests; the gateway's services have no request streams)."""
    handlers = {}
    for method in service_descriptor.methods:
        if method.client_streaming:
            raise ValueError(f"{method.full_name}: request streams are not supported by add_aio_servicer")
        req_cls = message_factory.GetMessageClass(method.input_type)
        serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
        impl = _implementation(servicer, method.name)
        if impl is None:
            continue
        if method.server_streaming and inspect.iscoroutinefunction(impl):  # writes with context.write
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _aio_unary_unary(impl, req_cls), response_serializer=serialize)
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _aio_unary_stream(impl, req_cls), response_serializer=serialize)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _aio_unary_unary(impl, req_cls), response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers),))


async def _aio_parse(cls, raw, context):
    try:
        return _parse(cls, raw)
    except ValueError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


def _aio_unary_unary(impl, cls):
    async def handler(raw, ctx):
        return await impl(await _aio_parse(cls, raw, ctx), ctx)
    return handler


def _aio_unary_stream(impl, cls):
    async def handler(raw, ctx):
        async for item in impl(await _aio_parse(cls, raw, ctx), ctx):
            yield item
    return handler


def add_health_and_reflection(server: grpc.Server, service_full_names: list[str]) -> health.HealthServicer:
    """Registers grpc.health.v1 (SERVING for "" and each service) and server reflection.

    Returns the HealthServicer so the caller can flip services to NOT_SERVING on shutdown.
    """
    servicer = health.HealthServicer()
    for name in ["", *service_full_names]:
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    add_servicer(servicer, HEALTH_SERVICE, server)  # a malformed request: INVALID_ARGUMENT, not INTERNAL
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
    add_aio_servicer(servicer, HEALTH_SERVICE, server)
    reflection.enable_server_reflection(
        [*service_full_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer


def channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
            extra_options: tuple[tuple[str, int | str], ...] = (),
            credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A client channel with the same message-size limits as the servers (TLS with `credentials`)."""
    options = size_options(max_message_bytes) + list(extra_options)
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


# While waiting for a server to come up, reconnect quickly: gRPC's default backoff after a refused
# connection starts at 1 s and grows, which would add seconds to every startup.
_FAST_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                   ("grpc.max_reconnect_backoff_ms", 250))


def wait_until_serving(address: str, timeout_s: float, service: str = "",
                       credentials: grpc.ChannelCredentials | None = None) -> None:
    """Polls the health service at `address` (over TLS with `credentials`) until `service` is SERVING.

    Raises TimeoutError naming the address (and the last status or error) after timeout_s seconds.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with channel(address, extra_options=_FAST_RECONNECT, credentials=credentials) as ch:
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
