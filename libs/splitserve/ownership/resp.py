"""The workers' Redis client: the few commands they send, pipelined over RESP2 on one socket.

A worker writes its block ownership (SADD, SREM, PEXPIRE, SMEMBERS, EXISTS, DEL) and renews its
registration (SET ... PX); nothing else. redis-py, which the gateway keeps for its asyncio reads,
costs a worker 8.9 MiB of resident memory on import (6.4 without OpenTelemetry installed, which it
imports when present), against issue 19's bound on a worker's memory; this module imports nothing
a worker has not imported already.

`Client(url, timeout_s)` takes the URLs `--redis-url` takes: redis://[[user]:password@]host[:port][/db],
rediss://... (TLS; query options ssl_cert_reqs=none|optional|required, ssl_ca_certs, ssl_certfile,
ssl_keyfile, ssl_check_hostname) and unix://[[user]:password@]/path[?db=N]. Any other option is a
ValueError that names it. Every call is one round trip under the client's lock (thread-safe). A
socket error or timeout closes the connection and raises ConnectionFailed; the next call connects
again (no retries: a worker's caller prefers a fast failure). A reply of the error type raises
ReplyError after every reply of the pipeline was read, so the connection stays usable.
"""
from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit


class RedisError(Exception):
    """Redis could not be reached, or answered with an error."""


class ConnectionFailed(RedisError):
    """No connection, a timeout or a broken one (the client reconnects at its next call)."""


class ReplyError(RedisError):
    """Redis answered a command with an error reply (WRONGTYPE, NOAUTH, ...)."""


_TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class Endpoint:
    host: str = ""
    port: int = 6379
    path: str = ""  # a unix socket's path (then host is "")
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: dict | None = None  # rediss://: the TLS options given (possibly none)


def redact_url(url: str) -> str:
    """The URL with any password replaced by '***' (for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def parse_url(url: str) -> Endpoint:
    """The endpoint of a redis://, rediss:// or unix:// URL; ValueError naming what is wrong
    (the URL shown without its password)."""
    parts = urlsplit(url)
    shown = redact_url(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {shown!r:.80}")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    allowed = ("db", *(_TLS_OPTIONS if parts.scheme == "rediss" else ()))
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise ValueError(f"redis_url option(s) {', '.join(unknown)} not supported here "
                         f"(a {parts.scheme}:// url takes {', '.join(allowed)})")
    db_text = query.get("db", "")
    if parts.scheme != "unix" and parts.path.strip("/"):
        db_text = parts.path.strip("/")
    try:
        db = int(db_text) if db_text else 0
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"redis_url {shown!r:.80}: the database and port must be integers") from None
    if db < 0:
        raise ValueError(f"redis_url {shown!r:.80}: the database must be >= 0")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"redis_url {shown!r:.80} names no socket path")
        return Endpoint(path=unquote(parts.path), db=db, username=user, password=password)
    if not parts.hostname:
        raise ValueError(f"redis_url {shown!r:.80} names no host")
    tls = None
    if parts.scheme == "rediss":
        tls = {k: query[k] for k in _TLS_OPTIONS if k in query}
        if tls.get("ssl_cert_reqs", "required").lower() not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, got {tls['ssl_cert_reqs']!r}")
    return Endpoint(host=parts.hostname, port=port, db=db, username=user, password=password, tls=tls)


def _tls_context(options: dict) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=options.get("ssl_ca_certs") or None)
    reqs = _CERT_REQS[options.get("ssl_cert_reqs", "required").lower()]
    check = options.get("ssl_check_hostname", "true").lower() not in ("false", "0", "no")
    ctx.check_hostname = check and reqs != ssl.CERT_NONE
    ctx.verify_mode = reqs
    if options.get("ssl_certfile"):
        ctx.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile") or None)
    return ctx


def encode_command(args: tuple) -> bytes:
    """One command as a RESP array of bulk strings (str as UTF-8, int as decimal)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = str(a).encode()
        elif not isinstance(a, (bytes, bytearray)):
            raise TypeError(f"a redis argument must be bytes, str or int, got {type(a).__name__}")
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class _Reader:
    """RESP2 replies off a socket: +simple, -error (returned as a ReplyError), :integer,
    $bulk (None for $-1), *array (None for *-1)."""

    def __init__(self, sock) -> None:
        self._sock, self._buf, self._pos = sock, b"", 0

    def _fill(self) -> None:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionFailed("redis closed the connection")
        self._buf = self._buf[self._pos:] + chunk
        self._pos = 0

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n", self._pos)) < 0:
            self._fill()
        line, self._pos = self._buf[self._pos:end], end + 2
        return line

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return ReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self._buf) - self._pos < n + 2:
                self._fill()
            data, self._pos = self._buf[self._pos:self._pos + n], self._pos + n + 2
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise ConnectionFailed(f"not a RESP reply: {line[:40]!r}")


class Client:
    """One connection to one Redis, opened on first use; see the module docstring."""

    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        self.endpoint = parse_url(url)
        self._tls = _tls_context(self.endpoint.tls) if self.endpoint.tls is not None else None
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._sock = None
        self._reader: _Reader | None = None

    def _connect(self) -> None:
        e = self.endpoint
        if e.path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(e.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((e.host, e.port), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(sock, server_hostname=e.host)
                except BaseException:
                    sock.close()
                    raise
        self._sock, self._reader = sock, _Reader(sock)
        setup = []
        if e.password is not None:
            setup.append(("AUTH", e.username, e.password) if e.username else ("AUTH", e.password))
        if e.db:
            setup.append(("SELECT", e.db))
        if setup:
            try:
                self._round_trip(setup)
            except ReplyError:  # wrong password, no such database: not a connection to keep
                self._close()
                raise

    def _round_trip(self, commands: list[tuple]) -> list:
        self._sock.sendall(b"".join(encode_command(c) for c in commands))
        replies = [self._reader.reply() for _ in commands]
        for r in replies:
            if isinstance(r, ReplyError):
                raise r
        return replies

    def execute(self, commands: list[tuple]) -> list:
        """Sends the commands in one write and returns their replies, in order."""
        if not commands:
            return []
        with self._lock:
            try:
                if self._sock is None:
                    self._connect()
                return self._round_trip(commands)
            except ConnectionFailed:
                self._close()
                raise
            except (OSError, ValueError) as exc:  # ValueError: a garbled length
                self._close()
                where = self.endpoint.path or f"{self.endpoint.host}:{self.endpoint.port}"
                raise ConnectionFailed(f"redis at {where}: {type(exc).__name__}: {exc}") from exc

    def pipeline(self) -> "Pipeline":
        return Pipeline(self)

    def ping(self) -> bool:
        return self.execute([("PING",)])[0] == b"PONG"

    def set(self, key: str, value: bytes, px: int | None = None) -> bool:
        args = ("SET", key, value) if px is None else ("SET", key, value, "PX", int(px))
        return self.execute([args])[0] == b"OK"

    def delete(self, *keys: str) -> int:
        return self.execute([("DEL", *keys)])[0]

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock, self._reader = None, None

    def close(self) -> None:
        with self._lock:
            self._close()


class Pipeline:
    """Commands queued for one round trip (no MULTI: each stands alone, as on Redis Cluster)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._commands: list[tuple] = []

    def _queue(self, *args) -> "Pipeline":
        self._commands.append(args)
        return self

    def sadd(self, key: str, *members) -> "Pipeline":
        return self._queue("SADD", key, *members)

    def srem(self, key: str, *members) -> "Pipeline":
        return self._queue("SREM", key, *members)

    def smembers(self, key: str) -> "Pipeline":
        return self._queue("SMEMBERS", key)

    def pexpire(self, key: str, ms: int) -> "Pipeline":
        return self._queue("PEXPIRE", key, int(ms))

    def exists(self, key: str) -> "Pipeline":
        return self._queue("EXISTS", key)

    def delete(self, *keys: str) -> "Pipeline":
        return self._queue("DEL", *keys)

    def execute(self) -> list:
        commands, self._commands = self._commands, []
        return self._client.execute(commands)
