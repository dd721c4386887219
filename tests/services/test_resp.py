"""The workers' Redis client (splitserve.ownership.resp) against real redis-servers, read back
through redis-py (an independent client)."""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid

import pytest
import redis

from splitserve.ownership import resp
from splitserve.ownership.redis_server import EmbeddedRedis, redis_server_binary


def _key(tag: str) -> str:
    return f"test:resp:{tag}:{uuid.uuid4().hex[:8]}"


def test_pipelined_commands_and_their_replies(redis_url):
    client, other = resp.Client(redis_url), redis.Redis.from_url(redis_url)
    key, flag = _key("set"), _key("flag")
    pipe = client.pipeline()
    pipe.sadd(key, "a", b"b", 3).pexpire(key, 30_000).smembers(key).exists(key).exists(_key("none"))
    added, expiring, members, exists, missing = pipe.execute()
    assert (added, expiring, exists, missing) == (3, 1, 1, 0)
    assert sorted(members) == [b"3", b"a", b"b"]
    assert 29_000 < other.pttl(key) <= 30_000
    removed, rest = client.pipeline().srem(key, "a", "zz").smembers(key).execute()
    assert removed == 1 and sorted(rest) == [b"3", b"b"]
    assert client.set(flag, b'{"state": "serving"}', px=5_000) and other.get(flag) == b'{"state": "serving"}'
    assert 4_000 < other.pttl(flag) <= 5_000
    assert client.delete(flag, key) == 2 and not other.exists(flag, key)
    assert client.ping() and client.pipeline().execute() == []


def test_a_large_reply_spans_many_reads(redis_url):
    client, key = resp.Client(redis_url), _key("big")
    members = [os.urandom(4096) for _ in range(300)]  # ~1.2 MB of reply, binary-safe (CR LF inside)
    client.pipeline().sadd(key, *members).execute()
    (back,) = client.pipeline().smembers(key).execute()
    assert sorted(back) == sorted(members)
    client.delete(key)


def test_an_error_reply_raises_and_leaves_the_connection_in_step(redis_url):
    client, key = resp.Client(redis_url), _key("str")
    assert client.set(key, b"a string")
    pipe = client.pipeline().exists(key).sadd(key, "x").exists(key)
    with pytest.raises(resp.ReplyError, match="WRONGTYPE"):
        pipe.execute()
    # every reply of that pipeline was read: the next round trip gets its own answers
    assert client.pipeline().exists(key).exists(_key("none")).execute() == [1, 0]
    client.delete(key)


def test_password_user_and_database():
    with EmbeddedRedis() as server:
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser("worker", enabled=True, passwords=["+s3cr:et"], commands=["+@all"], keys=["*"])
        admin.config_set("requirepass", "adm in")
        base = f"redis://127.0.0.1:{server.port}"
        with pytest.raises(resp.ReplyError):  # NOAUTH
            resp.Client(base).ping()
        with pytest.raises(resp.ReplyError):  # the wrong password
            resp.Client(f"redis://:nope@127.0.0.1:{server.port}").ping()
        assert resp.Client(f"redis://:adm%20in@127.0.0.1:{server.port}").ping()  # percent-decoded
        client = resp.Client(f"redis://worker:s3cr%3Aet@127.0.0.1:{server.port}/3")
        key = _key("db")
        client.set(key, b"in db 3")
        check = redis.Redis(host="127.0.0.1", port=server.port, password="adm in", db=3)
        assert check.get(key) == b"in db 3"
        assert not redis.Redis(host="127.0.0.1", port=server.port, password="adm in", db=0).exists(key)


def test_a_dropped_connection_fails_once_then_reconnects(redis_url):
    client = resp.Client(redis_url)
    (client_id,) = client.execute([("CLIENT", "ID")])
    assert redis.Redis.from_url(redis_url).client_kill_filter(_id=client_id) == 1
    with pytest.raises(resp.ConnectionFailed):
        client.ping()
    assert client.ping()  # a new connection
    assert client.execute([("CLIENT", "ID")])[0] != client_id


def test_a_redis_that_never_answers_times_out():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    accepted = []
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    client = resp.Client(f"redis://127.0.0.1:{silent.getsockname()[1]}", timeout_s=0.2)
    start = time.monotonic()
    with pytest.raises(resp.ConnectionFailed, match="timed out"):
        client.ping()
    assert time.monotonic() - start < 1.0
    silent.close()


def test_nothing_listening_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(resp.ConnectionFailed, match=f"127.0.0.1:{port}"):
        resp.Client(f"redis://127.0.0.1:{port}").ping()
    assert time.monotonic() - start < 1.0


def test_a_unix_socket(tmp_path):
    path = tmp_path / "redis.sock"
    proc = subprocess.Popen([redis_server_binary(), "--port", "0", "--unixsocket", str(path), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        client = resp.Client(f"unix://{path}?db=2")
        key = _key("unix")
        client.set(key, b"over a unix socket")
        assert redis.Redis(unix_socket_path=str(path), db=2).get(key) == b"over a unix socket"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("url, expected", [
    ("redis://h", resp.Endpoint(host="h")),
    ("redis://h:7000/4", resp.Endpoint(host="h", port=7000, db=4)),
    ("redis://h?db=5", resp.Endpoint(host="h", db=5)),
    ("redis://u:p%40ss@h/1", resp.Endpoint(host="h", db=1, username="u", password="p@ss")),
    ("redis://:pw@h", resp.Endpoint(host="h", password="pw")),
    ("unix:///run/redis.sock?db=3", resp.Endpoint(path="/run/redis.sock", db=3)),
    ("rediss://h:6380?ssl_cert_reqs=none", resp.Endpoint(host="h", port=6380, tls={"ssl_cert_reqs": "none"})),
])
def test_urls(url, expected):
    assert resp.parse_url(url) == expected


@pytest.mark.parametrize("url, message", [
    ("localhost:6379", "must start with redis://"),
    ("http://h", "must start with redis://"),
    ("redis://h?socket_timeout=1", "option.s. socket_timeout not supported"),
    ("redis://h?ssl_cert_reqs=none", "option.s. ssl_cert_reqs not supported"),  # TLS options need rediss
    ("redis://h/x", "must be integers"),
    ("redis://h:port", "must be integers"),
    ("redis://:hunter2@h/-1", "must be >= 0"),
    ("redis:///0", "names no host"),
    ("unix://", "names no socket path"),
    ("rediss://h?ssl_cert_reqs=sometimes", "ssl_cert_reqs must be one of"),
])
def test_bad_urls_name_what_is_wrong_and_hide_the_password(url, message):
    with pytest.raises(ValueError, match=message) as info:
        resp.parse_url(url)
    assert "hunter2" not in str(info.value)
