"""The checks `splitserve up` and the worker roles make before they start anything
(splitserve.launch.preflight): the model, the fixed ports, who answers on the gateway's port, and
the removal of what killed processes left in temporary directories."""
from __future__ import annotations

import json
import os
import socket
import struct

import pytest

from splitserve.kvstore import shm
from splitserve import owned_dirs
from splitserve.launch import preflight
from splitserve.launch.preflight import PreflightError
from splitserve.model.paths import default_model_path
from splitserve.ownership import redis_server


def _dead_pid() -> int:
    """A pid no process has: above the kernel's largest."""
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1


class _Handle:
    """What check_serves reads of a subprocess.Popen (poll and pid), for a process that exists."""

    def __init__(self, pid: int, returncode: int | None = None):
        self.pid, self.returncode = pid, returncode

    def poll(self) -> int | None:
        return self.returncode


# ---------------------------------------------------------------------------------------- model
def test_default_model_passes():
    assert preflight.check_model(None) == default_model_path()


def test_missing_model_names_the_file(tmp_path):
    with pytest.raises(PreflightError, match=rf"^--model: model not found: {tmp_path}/nope\.gguf "):
        preflight.check_model(str(tmp_path / "nope.gguf"))


def test_folder_without_a_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(PreflightError, match=rf"^--model: {tmp_path}: a folder without config\.json"):
        preflight.check_model(str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(12))
    with pytest.raises(PreflightError, match=rf"pass the file itself: {tmp_path}/m\.gguf"):
        preflight.check_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PreflightError, match=rf"^--model: {tmp_path}: no \*\.safetensors weight files"):
        preflight.check_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(_safetensors_head())
    assert preflight.check_model(str(tmp_path)) == tmp_path


def _safetensors_head() -> bytes:
    header = json.dumps({"__metadata__": {}}).encode()
    return struct.pack("<Q", len(header)) + header


def test_file_that_is_not_gguf_names_the_file(tmp_path):
    text = tmp_path / "model.bin"
    text.write_text("hello, not a model\n")
    with pytest.raises(PreflightError, match=rf"^--model: {text}: not a GGUF file"):
        preflight.check_model(str(text))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(PreflightError, match=rf"^--model: {empty}: not a GGUF file"):
        preflight.check_model(str(empty))
    alone = tmp_path / "model.safetensors"
    alone.write_bytes(_safetensors_head())
    with pytest.raises(PreflightError, match=rf"^--model: {alone}: a safetensors file alone cannot be loaded; "
                                             r"pass the Hugging Face checkpoint folder"):
        preflight.check_model(str(alone))
    gguf = tmp_path / "ok.gguf"
    gguf.write_bytes(b"GGUF" + bytes(12))  # the check reads the magic; the loader reads the rest
    assert preflight.check_model(str(gguf)) == gguf


def test_worker_roles_check_their_model_flag(tmp_path):
    bad = str(tmp_path / "missing.gguf")
    for role in ("prefill", "decode", "colocated"):
        with pytest.raises(PreflightError, match="missing.gguf"):
            preflight.check_role_args(role, ["--port", "0", "--model", bad])
    with pytest.raises(PreflightError, match="missing.gguf"):
        preflight.check_role_args("prefill", [f"--model={bad}"])
    preflight.check_role_args("prefill", ["--port", "0"])  # no --model: the default model
    preflight.check_role_args("prefill", ["--model", bad, "--help"])  # the role prints its help
    preflight.check_role_args("gateway", ["--model", bad])  # loads no model


# ---------------------------------------------------------------------------------------- ports
def test_a_port_in_use_is_named_with_its_flag():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(PreflightError, match=rf"^--http-port {port}: port {port} on 127\.0\.0\.1 is in use"):
            preflight.check_ports_free("127.0.0.1", {"--grpc-port": 0, "--http-port": port})
    preflight.check_ports_free("127.0.0.1", {"--grpc-port": 0, "--http-port": port})  # released: free again


def test_the_same_port_twice_is_refused():
    with pytest.raises(PreflightError, match=r"^--http-port 50051: the same port as --grpc-port"):
        preflight.check_ports_free("127.0.0.1", {"--grpc-port": 50051, "--http-port": 50051})


def test_check_serves_wants_the_child_to_hold_the_listener():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        preflight.check_serves(_Handle(os.getpid()), "gateway", [port])  # this process holds it
        # another process that is alive but does not hold the port: the answer came from someone else
        with pytest.raises(RuntimeError, match=rf"^port {port} answers, but not from the gateway this run started "
                                               rf"\(pid {os.getppid()}\)"):
            preflight.check_serves(_Handle(os.getppid()), "gateway", [port])
    with pytest.raises(RuntimeError, match="^gateway exited with code 1 during start-up"):
        preflight.check_serves(_Handle(os.getpid(), returncode=1), "gateway", [port])


# ---------------------------------------------------------------------------------------- leftovers
def test_owned_names_carry_the_pid():
    name = owned_dirs.owned_prefix("splitserve-x-") + "abcd"
    assert name == f"splitserve-x-{os.getpid()}-abcd"
    assert owned_dirs.owner_pid(name, "splitserve-x-") == os.getpid()
    assert owned_dirs.owner_pid("splitserve-x-abcd", "splitserve-x-") is None  # no pid: not ours to judge
    assert owned_dirs.owner_pid("other-123-abcd", "splitserve-x-") is None


def test_remove_dead_owners_removes_only_dead_owners_directories(tmp_path):
    dead, prefix = _dead_pid(), "splitserve-x-"
    orphan = tmp_path / f"{prefix}{dead}-0001"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "sub" / "file").write_text("x")
    mine = tmp_path / f"{prefix}{os.getpid()}-0002"  # alive: this process
    parents = tmp_path / f"{prefix}{os.getppid()}-0003"  # alive: another process
    unnamed = tmp_path / f"{prefix}abcdefgh"  # no pid in the name
    other = tmp_path / f"another-{dead}-0004"
    for d in (mine, parents, unnamed, other):
        d.mkdir()
    plain_file = tmp_path / f"{prefix}{dead}-0005"
    plain_file.write_text("not a directory")
    link = tmp_path / f"{prefix}{dead}-0006"
    link.symlink_to(mine)
    kept_by_rule = tmp_path / f"{prefix}{dead}-0007"
    kept_by_rule.mkdir()

    removed = owned_dirs.remove_dead_owners(str(tmp_path), prefix, keep=lambda p: p.endswith("-0007"))
    assert removed == [str(orphan)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (mine, parents, unnamed, other, plain_file, link, kept_by_rule))
    assert owned_dirs.remove_dead_owners(str(tmp_path / "absent"), prefix) == []


def test_embedded_redis_dir_is_named_for_its_owner_and_leftovers_go(tmp_path):
    orphan = tmp_path / f"{redis_server.DIR_PREFIX}{_dead_pid()}-abcdefgh"
    orphan.mkdir()
    (orphan / "redis.log").write_text("log")
    live = tmp_path / f"{redis_server.DIR_PREFIX}{os.getpid()}-abcdefgh"
    live.mkdir()
    assert redis_server.remove_leftovers(str(tmp_path)) == [str(orphan)]
    assert not orphan.exists() and live.exists()


def test_kvstore_leftovers_of_another_host_stay(tmp_path):
    dead = _dead_pid()
    ours = tmp_path / f"{shm.DIR_PREFIX}{dead}-00000001"
    theirs = tmp_path / f"{shm.DIR_PREFIX}{dead}-00000002"
    no_host = tmp_path / f"{shm.DIR_PREFIX}{dead}-00000003"
    for d in (ours, theirs, no_host):
        d.mkdir()
    (ours / shm.HOST_NAME).write_bytes(socket.gethostname().encode())
    (theirs / shm.HOST_NAME).write_bytes(b"another-host")
    assert sorted(shm.remove_orphans(str(tmp_path))) == sorted([str(ours), str(no_host)])
    assert theirs.exists()


def test_remove_leftovers_covers_the_redis_and_kvstore_directories(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "shm").mkdir()
    redis_dir = tmp_path / "tmp" / f"{redis_server.DIR_PREFIX}{_dead_pid()}-abcdefgh"
    kv_dir = tmp_path / "shm" / f"{shm.DIR_PREFIX}{_dead_pid()}-00000001"
    redis_dir.mkdir()
    kv_dir.mkdir()
    assert sorted(preflight.remove_leftovers(str(tmp_path / "shm"))) == sorted([str(redis_dir), str(kv_dir)])
