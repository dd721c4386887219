"""OwnershipRegistry and OwnershipReporter against a real Redis (EmbeddedRedis, or $REDIS_URL)."""
from __future__ import annotations

import hashlib
import os
import time
import uuid

import pytest
import redis

from splitserve.ownership.registry import (
    BLOCK_KEY_PREFIX, OWNER_KEY_PREFIX, OwnershipRegistry, OwnershipReporter, OwnershipUnavailable,
    redact_url,
)
from splitserve.ownership.redis_server import EmbeddedRedis, redis_server_binary


@pytest.fixture
def owner() -> str:
    """A fresh owner id per test, so tests never see each other's keys (also on a shared Redis)."""
    return f"prefill:test-{uuid.uuid4().hex[:8]}:50061"


def hashes(n: int, tag: str) -> list[bytes]:
    return [hashlib.sha256(f"{tag}-{i}-{uuid.uuid4()}".encode()).digest() for i in range(n)]


def test_record_owners_remove(redis_url, owner):
    reg = OwnershipRegistry(redis_url)
    other = owner.replace("prefill", "kvstore")
    a, b, c = hashes(3, "rec")
    reg.record(owner, [a, b])
    reg.record(other, [b])
    assert reg.owners([a, b, c]) == [{owner}, {owner, other}, set()]
    assert reg.owners([c, a]) == [set(), {owner}]  # input order
    reg.remove(owner, [b])
    assert reg.owners([a, b]) == [{owner}, {other}]
    reg.remove(other, [b])
    client = redis.Redis.from_url(redis_url)
    assert not client.exists(BLOCK_KEY_PREFIX + b.hex())  # an empty set vanishes
    assert reg.owners([]) == []


def test_owners_is_one_round_trip(redis_url, owner):
    reg = OwnershipRegistry(redis_url)
    blocks = hashes(50, "rt")
    reg.record(owner, blocks)
    sent = []
    sock = reg._client._sock  # connected by record()

    class CountingSocket:  # every socket write of this client's connection
        def sendall(self, data):
            sent.append(data)
            return sock.sendall(data)

        def __getattr__(self, name):
            return getattr(sock, name)

    reg._client._sock = CountingSocket()
    before = reg.round_trips
    result = reg.owners(blocks)
    assert result == [{owner}] * 50
    assert reg.round_trips == before + 1
    assert len(sent) == 1  # all 50 SMEMBERS in one write


def test_record_sets_a_ttl_on_every_key(redis_url, owner):
    reg = OwnershipRegistry(redis_url, ttl_s=30)
    blocks = hashes(3, "ttl")
    reg.record(owner, blocks)
    client = redis.Redis.from_url(redis_url)
    for key in [BLOCK_KEY_PREFIX + h.hex() for h in blocks] + [OWNER_KEY_PREFIX + owner]:
        assert 29_000 < client.pttl(key) <= 30_000


def test_entries_expire_after_the_ttl(redis_url, owner):
    reg = OwnershipRegistry(redis_url, ttl_s=0.2)
    (block,) = hashes(1, "exp")
    reg.record(owner, [block])
    assert reg.owners([block]) == [{owner}]
    time.sleep(0.35)
    assert reg.owners([block]) == [set()]


def test_clear_owner_removes_only_that_owner(redis_url, owner):
    reg = OwnershipRegistry(redis_url)
    other = owner.replace("prefill", "decode")
    blocks = hashes(4, "clr")
    reg.record(owner, blocks)
    reg.record(other, blocks[:2])
    assert reg.clear_owner(owner) == 4
    assert reg.owners(blocks) == [{other}, {other}, set(), set()]
    assert reg.clear_owner(owner) == 0
    assert not redis.Redis.from_url(redis_url).exists(OWNER_KEY_PREFIX + owner)


def test_bad_arguments_are_value_errors(redis_url):
    reg = OwnershipRegistry(redis_url)
    with pytest.raises(ValueError, match="owner id"):
        reg.record("", hashes(1, "x"))
    with pytest.raises(ValueError, match="block hash"):
        reg.owners([b""])


def test_unavailable_redis_raises_ownership_unavailable_fast(owner):
    server = EmbeddedRedis().start()
    reg = OwnershipRegistry(server.url)
    assert reg.ping()
    server.stop()
    assert not reg.ping()
    start = time.monotonic()
    for call in (lambda: reg.owners(hashes(2, "down")), lambda: reg.record(owner, hashes(1, "down")),
                 lambda: reg.remove(owner, hashes(1, "down")), lambda: reg.clear_owner(owner)):
        with pytest.raises(OwnershipUnavailable, match=f"127.0.0.1:{server.port}"):
            call()
    assert time.monotonic() - start < 2.0  # no retries with backoff


def test_reporter_rebuilds_ownership_after_an_outage(owner):
    server = EmbeddedRedis().start()
    try:
        reg = OwnershipRegistry(server.url)
        held: list[bytes] = []  # what the reporting process holds
        (stale,) = hashes(1, "stale")
        reg.record(owner, [stale])  # left by a previous incarnation of this owner
        reporter = OwnershipReporter(reg, owner, snapshot=lambda: list(held), refresh_s=60, retry_s=0.05)
        reporter.start()
        try:
            assert reporter.synced
            assert reg.owners([stale]) == [set()]  # start() cleared it
            held += hashes(3, "rep")
            reporter.record(held)
            assert reg.owners(held) == [{owner}] * 3
            server.stop()
            held += hashes(1, "new")
            reporter.record(held)  # the new block's record fails once, then records are skipped while down
            assert not reporter.synced
            server = EmbeddedRedis(port=server.port).start()  # a new, empty Redis
            deadline = time.monotonic() + 5
            while not reporter.synced and time.monotonic() < deadline:
                time.sleep(0.02)
            assert reg.owners(held) == [{owner}] * 4
        finally:
            reporter.stop()
    finally:
        server.stop()


def test_redact_url_and_binary():
    assert redact_url("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"
    assert os.access(redis_server_binary(), os.X_OK)


def test_embedded_redis_leaves_no_process():
    server = EmbeddedRedis().start()
    proc = server._proc
    assert server.running and redis.Redis.from_url(server.url).ping()
    server.stop()
    assert proc.poll() is not None and not server.running
    server.stop()  # idempotent


def test_reporter_sends_only_blocks_it_has_not_recorded(redis_url, owner):
    """A prefix hit records its whole prompt again: the blocks recorded already cost no Redis
    command; a removed block is recorded again when it comes back; a resync (the refresh) makes
    what Redis holds and what the reporter knows the snapshot again."""
    reg = OwnershipRegistry(redis_url)
    held: list[bytes] = []
    reporter = OwnershipReporter(reg, owner, snapshot=lambda: list(held), refresh_s=60)
    reporter.start()
    try:
        prefix, (x, y) = hashes(4, "prefix"), hashes(2, "suffix")
        held += prefix + [x]
        reporter.record(prefix + [x])
        trips = reg.round_trips
        reporter.record(prefix + [x])  # a full hit: nothing new
        assert reg.round_trips == trips and reporter.num_recorded == 5
        held.append(y)
        reporter.record(prefix + [y])  # a hit with another suffix: only y is sent
        assert reg.round_trips == trips + 1
        assert reg.owners(prefix + [x, y]) == [{owner}] * 6
        reporter.remove([prefix[3]])  # evicted
        assert reg.owners([prefix[3]]) == [set()]
        reporter.record(prefix)  # cached again: recorded again
        assert reg.owners([prefix[3]]) == [{owner}] and reporter.num_recorded == 6
        redis.Redis.from_url(redis_url).delete(BLOCK_KEY_PREFIX + x.hex())  # lost behind our back
        reporter.record([x])
        assert reg.owners([x]) == [set()]  # not resent: the reporter believes Redis has it ...
        held.remove(y)
        reporter._resync()  # ... until the refresh re-records what is held
        assert reg.owners([x]) == [{owner}] and reporter.num_recorded == 5
        reporter.record([y])
        assert reg.owners([y]) == [{owner}]
    finally:
        reporter.stop()
