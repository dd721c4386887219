"""One config source: the role configs and their parts, the flags generated from them and the way
back (config -> argv), `splitserve up`'s flags derived from the same classes, the metrics ports and
scrape config, the environment registry, and the one logging set-up."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import logging
import re
from pathlib import Path
from unittest import mock

import pytest

from splitserve import logs
from splitserve.config import env
from splitserve.config.engine import CacheConfig
from splitserve.config.flags import (add_config_args, config_from_args, config_to_argv, flag_name, flat_fields,
                                     flat_values, from_flat)
from splitserve.config.gateway import GatewayConfig
from splitserve.config.kvstore import KVStoreConfig
from splitserve.config.launch import ROLE_CONFIGS, SHARED_WORKER_FIELDS, UpConfig
from splitserve.config.speculative import SpeculativeConfig
from splitserve.config.worker import WorkerConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = (GatewayConfig, KVStoreConfig, WorkerConfig, UpConfig)
# values a config accepts for fields whose generic sample (below) it would reject
SAMPLES = {"dtype": "float32", "device": "cuda", "block_size": 32, "cpus": "0", "redis_url": "redis://r:1/2",
           "tls_ca_file": "/c/ca.pem", "tls_cert_file": "/c/cert.pem", "tls_key_file": "/c/key.pem",
           "internal_tls_ca_file": "/c/ca.pem", "internal_tls_cert_file": "/c/gw.pem",
           "internal_tls_key_file": "/c/gw.key", "decode_busy_kv_usage": 0.5, "log_format": "json",
           "log_level": "DEBUG", "prefill_workers": 2, "decode_workers": 3, "quantized_matmul": "int8",
           "trace_sample_ratio": 0.25, "quantization": "int8", "kv_cache_dtype": "fp8_e4m3",
           "pin_threads": "off"}


def sample(ff):
    """A value of field `ff` that differs from its default and that its config accepts."""
    if ff.name in SAMPLES:
        return SAMPLES[ff.name]
    if ff.name.endswith("speculative_config"):  # canonical JSON: what the config keeps
        return SpeculativeConfig("ngram", 3).to_json()
    if ff.kind is bool:
        return True if ff.default is None else not ff.default
    if ff.kind is int:
        return 7 if ff.default is None else ff.default + 1
    if ff.kind is float:
        return ff.default * 2 if ff.default else 0.5
    return f"x-{ff.name}"


def samples(cls) -> dict:
    return {ff.name: sample(ff) for ff in flat_fields(cls)}


def parser_of(cls) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config_args(p, cls)
    return p


# ------------------------------------------------------------------------------ config source
@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_documented_and_flags_keep_their_names(cls):
    for ff in flat_fields(cls):
        assert ff.doc, f"{cls.__name__}.{'.'.join(ff.path)} has no docstring"
    names = {ff.name for ff in flat_fields(cls)}
    old = {GatewayConfig: {"host", "port", "prefill", "decode", "redis_url", "served_model_name", "http_port",
                           "internal_tls_ca_file", "internal_tls_cert_file", "internal_tls_key_file",
                           "tls_cert_file", "tls_key_file", "api_key", "max_message_bytes", "overlap_weight",
                           "busy_queued_tokens", "decode_seq_weight", "decode_kv_usage_weight", "decode_busy_kv_usage"},
           KVStoreConfig: {"host", "port", "advertise_address", "capacity_gb", "redis_url", "ownership_ttl_s",
                           "tls_ca_file", "tls_cert_file", "tls_key_file", "metrics_port", "metrics_host",
                           "max_message_bytes", "shm_dir", "max_workers"},
           WorkerConfig: {"host", "port", "advertise_address", "model", "dtype", "device", "kv_cache_memory_gb",
                          "block_size", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_caching",
                          "max_pending", "kvstore", "redis_url", "ownership_ttl_s", "kv_lease_ttl_s", "tls_ca_file",
                          "tls_cert_file", "tls_key_file", "max_message_bytes", "grpc_threads", "torch_threads",
                          "cpus", "metrics_port", "metrics_host"},
           UpConfig: {"prefill_workers", "decode_workers", "colocated", "redis_url", "internal_tls_ca_file",
                      "tls_ca_file", "startup_timeout_s", "restart", "log_format", "metrics_port"}}[cls]
    assert old <= names, f"flags that compose, tests or benchmarks use are gone: {sorted(old - names)}"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_to_argv_is_the_inverse_of_the_flags(cls):
    config = from_flat(cls, samples(cls))
    assert flat_values(config) == samples(cls)  # every field off its default
    argv = config_to_argv(config)
    assert config_from_args(cls, parser_of(cls).parse_args(argv)) == config
    assert config_to_argv(cls()) == [], "a default config needs no flags"
    assert config_from_args(cls, parser_of(cls).parse_args([])) == cls()


def test_parts_are_shared_and_one_default_per_field():
    w, k, g = WorkerConfig(), KVStoreConfig(), GatewayConfig()
    assert type(w.server) is type(k.server) and type(w.tls) is type(k.tls) is type(g.internal_tls)
    assert type(w.metrics) is type(k.metrics) and type(w.ownership) is type(k.ownership)
    assert w.engine.cache == CacheConfig() and w.kv_cache_memory_gb == CacheConfig.kv_cache_memory_gb == 1.0
    assert (w.port, k.port, g.port) == (50061, 50070, 50051)  # a role's own default through its part
    assert w.max_message_bytes == 64 << 20 and k.max_message_bytes == 16 << 20


def test_flat_names_build_and_read_through_the_parts():
    w = WorkerConfig(port=0, dtype="float32", redis_url="redis://h:1/0", metrics_port=-1)
    assert (w.server.port, w.engine.model.dtype, w.ownership.redis_url, w.metrics.metrics_port) == \
        (0, "float32", "redis://h:1/0", -1)
    assert (w.port, w.dtype, w.redis_url, w.metrics_port) == (0, "float32", "redis://h:1/0", -1)
    assert dataclasses.replace(w, block_size=32).engine.cache.block_size == 32
    g = GatewayConfig(internal_tls_ca_file="a", internal_tls_cert_file="b", internal_tls_key_file="c")
    assert g.internal_tls.tls_ca_file == "a" and g.internal_tls_key_file == "c"
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        WorkerConfig(bogus=1)
    with pytest.raises(AttributeError, match="bogus"):
        w.bogus  # noqa: B018


def test_bad_values_name_the_field():
    for cls, bad, words in ((WorkerConfig, {"metrics_port": 70000}, "metrics_port"),
                            (WorkerConfig, {"block_size": 3}, "block_size"),
                            (WorkerConfig, {"redis_url": "http://x"}, "redis_url"),
                            (WorkerConfig, {"grpc_threads": 0}, "grpc_threads"),
                            (KVStoreConfig, {"port": 70000}, "port"),
                            (KVStoreConfig, {"tls_ca_file": "ca"}, "tls_cert_file"),
                            (GatewayConfig, {"http_port": -2}, "http_port"),
                            (UpConfig, {"metrics_port": -2}, "metrics_port")):
        with pytest.raises(ValueError, match=words):
            from_flat(cls, bad)
    with pytest.raises(SystemExit):  # argparse refuses a dtype that is not one of the choices
        parser_of(WorkerConfig).parse_args(["--dtype", "int8"])


def test_optional_fields_take_an_empty_flag_as_none():
    ns = parser_of(WorkerConfig).parse_args(["--model", "", "--max-model-len", ""])
    config = config_from_args(WorkerConfig, ns)
    assert config.model is None and config.max_model_len is None


# ------------------------------------------------------------------------------ splitserve up
def up_args(*flags: str) -> argparse.Namespace:
    from splitserve.launch.cli import build_parser

    return build_parser().parse_args(["up", *flags])


def up_children(*flags: str) -> dict:
    """name -> Child of what `splitserve up FLAGS` would start (nothing is started)."""
    from splitserve.launch.up import Launcher

    launcher = Launcher(up_args("--redis-url", "redis://r:1/0", *flags))
    launcher._spawn = lambda child: launcher.children.append(child) or child
    launcher._wait_healthy = lambda child, timeout_s: None
    launcher.print_endpoints = lambda: None
    with mock.patch("splitserve.launch.preflight.check_serves"):
        launcher.start()
    return {c.name: c for c in launcher.children}


def role_parser(cls) -> argparse.ArgumentParser:
    """The parser a role's main() builds: its config's flags and --log-level."""
    p = parser_of(cls)
    logs.add_log_args(p)
    return p


def flags_for(role: str, values: dict) -> list[str]:
    out = []
    for ff in flat_fields(ROLE_CONFIGS[role]):
        value = values[ff.name]
        flag = flag_name(ff, role + "-")
        out += ([flag] if value else ["--no-" + flag[2:]]) if ff.kind is bool else [flag, str(value)]
    return out


def test_every_flag_of_every_role_is_settable_through_up():
    """Each role's flags, derived from its config class, given to `up` as --ROLE-FIELD, reach that
    role's child config; each child's argv parses back to that config with the role's own flags."""
    wanted = {role: samples(cls) for role, cls in ROLE_CONFIGS.items()}
    wanted["decode"].update(dtype="bfloat16", block_size=64, cpus="0", model="/m/decode.gguf")
    argv = [a for role in ROLE_CONFIGS for a in flags_for(role, wanted[role])]
    children = up_children(*argv)
    assert set(children) == {"kvstore", "prefill-0", "decode-0", "gateway"}
    for name, child in children.items():
        role = child.argv[0]
        assert flat_values(child.config) == wanted[role], name
        ns = role_parser(ROLE_CONFIGS[role]).parse_args(child.argv[1:])
        assert config_from_args(ROLE_CONFIGS[role], ns) == child.config, f"{name}: argv does not rebuild its config"
        assert ns.log_level == "INFO"


def test_up_role_less_worker_flags_gateway_aliases_and_precedence():
    children = up_children("--model", "/m/a.gguf", "--decode-model", "/m/b.gguf", "--kv-cache-memory-gb", "0.3",
                           "--prefill-kv-cache-memory-gb", "0.2", "--dtype", "float32", "--host", "0.0.0.0",
                           "--grpc-port", "41234", "--http-port", "41235", "--api-key", "k",
                           "--gateway-overlap-weight", "50", "--gateway-served-model-name", "tiny",
                           "--decode-cpus", "0", "--torch-threads", "3", "--log-level", "DEBUG",
                           "--internal-tls-ca-file", "/c/ca", "--internal-tls-cert-file", "/c/crt",
                           "--internal-tls-key-file", "/c/key")
    p, d, g, k = children["prefill-0"].config, children["decode-0"].config, children["gateway"].config, \
        children["kvstore"].config
    assert (p.model, p.kv_cache_memory_gb, p.dtype) == ("/m/a.gguf", 0.2, "float32")
    assert (d.model, d.kv_cache_memory_gb, d.dtype, d.cpus) == ("/m/b.gguf", 0.3, "float32", "0")
    assert p.torch_threads == d.torch_threads == 3
    assert (g.host, g.port, g.http_port, g.api_key, g.served_model_name) == ("0.0.0.0", 41234, 41235, "k", "tiny")
    assert g.router.overlap_weight == 50.0 and "--overlap-weight" in children["gateway"].argv
    assert g.prefill == children["prefill-0"].address and g.decode == children["decode-0"].address
    for c in (p, d, k):  # what up decides: loopback, Redis, the stack's TLS; the kvstore for workers
        assert c.host == "127.0.0.1" and c.redis_url == "redis://r:1/0" and c.tls.tls_ca_file == "/c/ca"
    assert g.internal_tls.tls_cert_file == "/c/crt" and g.redis_url == "redis://r:1/0"
    assert p.kvstore == d.kvstore == children["kvstore"].address
    assert all(c.argv[-2:] == ["--log-level", "DEBUG"] for c in children.values())


def test_up_threads_default_to_the_cores_a_worker_may_use():
    from splitserve.config.cpus import available_cpus

    children = up_children("--prefill-cpus", "0")
    assert children["prefill-0"].config.torch_threads == 1
    assert children["decode-0"].config.torch_threads == len(available_cpus())  # the process's affinity


def test_a_team_is_pinned_where_it_has_one_thread_per_core_it_may_use():
    from splitserve.config.cpus import team_cores

    assert team_cores("auto", 4, [2, 3, 6, 7]) == [2, 3, 6, 7]  # thread i on the i-th core
    assert team_cores("auto", 1, [5]) == [5]
    assert team_cores("auto", 2, [0, 1, 2, 3]) is None  # other workers may count on the other cores
    assert team_cores("auto", 8, [0, 1, 2, 3]) is None  # more threads than cores: nothing to pin them to
    assert team_cores("off", 4, [0, 1, 2, 3]) is None
    assert team_cores("auto", 0, [0]) is None  # torch's own threads: the loop sets no team size
    with pytest.raises(ValueError, match="pin_threads must be auto or off, got 'on'"):
        team_cores("on", 1, [0])
    with pytest.raises(ValueError, match="pin_threads must be one of auto, off, got 'yes'"):
        from_flat(WorkerConfig, {"pin_threads": "yes"})
    children = up_children("--pin-threads", "off", "--decode-pin-threads", "auto")
    assert (children["prefill-0"].config.pin_threads, children["decode-0"].config.pin_threads) == ("off", "auto")


def test_up_help_shows_every_role_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        up_args("--help")
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "--kv-cache-memory-gb KV_CACHE_MEMORY_GB Memory budget" in text and "(default: 1.0)" in text
    for role, cls in ROLE_CONFIGS.items():
        for ff in flat_fields(cls):
            assert flag_name(ff, role + "-") in text, f"--{role}-{ff.name} missing from `up --help`"
    assert "--grpc-port PORT, --gateway-port PORT Port of the gRPC server (0: a free one). (default: 50051)" in text
    assert "--gateway-overlap-weight OVERLAP_WEIGHT" in text and "--decode-model MODEL" in text
    for name in SHARED_WORKER_FIELDS:
        assert re.search(f"--{name.replace('_', '-')}[ ,]", text), name


def test_up_refuses_bad_role_settings_before_starting_anything():
    from splitserve.launch.up import check_settings

    for flags, words in ((["--decode-block-size", "3"], "decode settings: block_size"),
                         (["--gateway-decode-busy-kv-usage", "2"], "gateway settings: decode_busy_kv_usage"),
                         (["--kvstore-chunk-bytes", "0"], "kvstore settings: chunk_bytes"),
                         (["--prefill-cpus", "99999"], "--prefill-cpus: cpu list '99999'"),
                         (["--http-port", "-1"], "--http-port must be in [0, 65535]"),
                         (["--prefill-workers", "0"], "at least 1"),
                         (["--redis-url", "localhost:6379"], "redis_url must start with redis://")):
        with pytest.raises(ValueError, match=re.escape(words)):
            check_settings(up_args(*flags))


# ------------------------------------------------------------------------------ metrics ports
def test_metrics_ports_sit_at_fixed_offsets_from_the_base():
    children = up_children("--metrics-port", "30000", "--prefill-workers", "2", "--decode-workers", "2")
    ports = {name: c.config.metrics_port for name, c in children.items() if name != "gateway"}
    assert ports == {"kvstore": 30000, "prefill-0": 30010, "prefill-1": 30011, "decode-0": 30020, "decode-1": 30021}
    assert children["decode-1"].metrics_url == "http://127.0.0.1:30021/metrics"
    assert children["gateway"].metrics_url == "http://127.0.0.1:8000/metrics"  # on its HTTP port
    colocated = up_children("--metrics-port", "30000", "--colocated", "--prefill-workers", "2")
    assert {n: c.config.metrics_port for n, c in colocated.items() if n != "gateway"} == \
        {"colocated-0": 30010, "colocated-1": 30011}
    off = up_children("--metrics-port", "-1")
    assert all(c.config.metrics_port == -1 and not c.metrics_url for n, c in off.items() if n != "gateway")
    with pytest.raises(ValueError, match="at most 10 workers"):
        from_flat(UpConfig, {"metrics_port": 30000, "prefill_workers": 11})


def test_print_scrape_config_lists_the_fixed_ports_and_exits(capsys):
    from splitserve.launch.up import cmd_up

    assert cmd_up(up_args("--metrics-port", "30000", "--http-port", "8123", "--prefill-workers", "2",
                          "--print-scrape-config")) == 0
    text = capsys.readouterr().out
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the printed config")
    jobs = {job["job_name"]: job for job in yaml.safe_load(text)["scrape_configs"]}
    targets = {sc["labels"]["process"]: sc["targets"] for job in jobs.values() for sc in job["static_configs"]}
    assert targets == {"gateway": ["127.0.0.1:8123"], "kvstore": ["127.0.0.1:30000"],
                       "prefill-0": ["127.0.0.1:30010"], "prefill-1": ["127.0.0.1:30011"],
                       "decode-0": ["127.0.0.1:30020"]}
    assert jobs["splitserve-gateway"]["scheme"] == "http"
    with pytest.raises(ValueError, match="--print-scrape-config needs fixed ports"):
        cmd_up(up_args("--print-scrape-config"))


# ------------------------------------------------------------------------------ environment
def test_registry_reads_types_defaults_and_fails_naming_the_variable(monkeypatch):
    for var in env.REGISTRY.values():
        assert var.name.startswith("SPLITSERVE_") and var.doc
        monkeypatch.delenv(var.name, raising=False)
        assert var.read() == var.default
        monkeypatch.setenv(var.name, "  ")
        assert var.read() == var.default  # blank is unset
        if var.choices or var.kind is int:
            monkeypatch.setenv(var.name, "not-a-value")
            with pytest.raises(ValueError, match=var.name):
                var.read()
    monkeypatch.setenv("SPLITSERVE_CPU_QUANT_ROWS", "8")
    assert env.CPU_QUANT_ROWS.read() == 8
    monkeypatch.setenv("SPLITSERVE_CPU_QUANT_ROWS", "-1")
    with pytest.raises(ValueError, match="SPLITSERVE_CPU_QUANT_ROWS must be an integer >= 0, got '-1'"):
        env.CPU_QUANT_ROWS.read()
    monkeypatch.setenv("SPLITSERVE_LOG_FORMAT", " JSON ")
    assert env.LOG_FORMAT.read() == "json"
    with pytest.raises(KeyError, match="SPLITSERVE_NOPE is not a registered"):
        env.read("SPLITSERVE_NOPE")


def _sources():
    for root in (REPO / "libs" / "splitserve", REPO / "services"):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if not rel.startswith(("libs/splitserve/v1/", "libs/splitserve/services/")):  # generated; a symlink
                yield path


def _environ_reads(tree: ast.AST):
    """(line, key node) of every os.environ[...] / os.environ.get|pop|setdefault(...) / getenv(...)."""
    def is_environ(node):
        return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
            (isinstance(node, ast.Name) and node.id == "environ")

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and is_environ(node.value):
            yield node.lineno, node.slice
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if is_environ(node.func.value) and node.func.attr in ("get", "pop", "setdefault") and node.args:
                yield node.lineno, node.args[0]
            elif node.func.attr == "getenv" and node.args:
                yield node.lineno, node.args[0]
        elif isinstance(node, ast.Compare) and any(is_environ(c) for c in node.comparators):
            yield node.lineno, node.left


def test_only_the_registry_reads_splitserve_variables():
    """No module but config/env.py reads a SPLITSERVE_* variable (or any variable by a computed
    name) from os.environ, and every SPLITSERVE_* name in the sources is a registered one."""
    registry = REPO / "libs" / "splitserve" / "config" / "env.py"
    offenders, unknown = [], set()
    for path in _sources():
        text = path.read_text()
        unknown |= set(re.findall(r"\bSPLITSERVE_[A-Z0-9_]*[A-Z0-9]\b", text)) - set(env.REGISTRY)
        if path == registry:
            continue
        for line, key in _environ_reads(ast.parse(text)):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)) or key.value.startswith("SPLITSERVE_"):
                offenders.append(f"{path.relative_to(REPO)}:{line}")
    assert not offenders, f"read SPLITSERVE_* (or a computed name) outside config/env.py: {offenders}"
    assert not unknown, f"SPLITSERVE_* names not declared in config/env.py: {sorted(unknown)}"


def test_configuration_doc_lists_every_variable():
    doc = (REPO / "docs" / "configuration.md").read_text()
    assert env.markdown_table() in doc, "docs/configuration.md: paste config.env.markdown_table() again"


# ------------------------------------------------------------------------------ logging
def test_one_logging_setup(monkeypatch):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("splitserve").level)
    try:
        logs.configure("DEBUG")
        assert logging.getLogger("splitserve").level == logging.DEBUG and root.level == logging.WARNING
        assert len(root.handlers) == 1
        logs.configure(logging.INFO)
        assert len(root.handlers) == 1 and logging.getLogger("splitserve.x").getEffectiveLevel() == logging.INFO
        with pytest.raises(ValueError, match="log level must be one of"):
            logs.configure("LOUD")
        monkeypatch.setenv("SPLITSERVE_LOG_FORMAT", "xml")
        with pytest.raises(ValueError, match="SPLITSERVE_LOG_FORMAT='xml'"):
            logs.configure()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("splitserve").setLevel(saved[2])
    for path in _sources():  # nobody else sets handlers or the root level up
        if path.name == "logs.py":
            continue
        text = path.read_text()
        assert "basicConfig" not in text and "getLogger().setLevel" not in text, path


# ------------------------------------------------------------------------------------ dtype "auto"
def test_dtype_auto_is_the_default_everywhere():
    from splitserve.config.engine import ModelConfig
    from splitserve.llm import LLM

    assert ModelConfig().dtype == "auto"
    assert WorkerConfig().engine.model.dtype == "auto"
    assert inspect_default(LLM.__init__, "dtype") == "auto"
    from splitserve.launch.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["demo"]).dtype == "auto"
    # `up` forwards --dtype to the workers only when given (each then takes WorkerConfig's "auto");
    # given, "auto" is one of its choices
    parser.parse_args(["up", "--dtype", "auto"])


def inspect_default(fn, name):
    import inspect

    return inspect.signature(fn).parameters[name].default


@pytest.mark.parametrize("device, flags, cuda_bf16, expected", [
    ("cpu", {"avx2", "fma", "avx512f"}, False, "float32"),
    ("cpu", {"avx2", "avx512_bf16"}, False, "bfloat16"),
    ("cpu", {"avx2", "amx_bf16", "amx_tile"}, False, "bfloat16"),
    ("cpu", set(), False, "float32"),  # no /proc/cpuinfo: no bf16 instructions assumed
    ("cuda", set(), True, "bfloat16"),
    ("cuda:1", {"avx512_bf16"}, False, "float16"),  # the CPU's flags do not matter on CUDA
])
def test_dtype_auto_choice(device, flags, cuda_bf16, expected):
    from splitserve.config.engine import resolve_dtype

    chosen, why = resolve_dtype("auto", device, frozenset(flags), cuda_bf16)
    assert chosen == expected
    assert ("no native bfloat16" in why) == (device == "cpu" and expected == "float32")
    for explicit in ("float32", "bfloat16"):  # an explicit choice is kept, whatever the machine
        assert resolve_dtype(explicit, device, frozenset(flags), cuda_bf16) == (explicit, "given explicitly")
    # a model of GGUF blocks computes in float32 on any CPU (the block kernels take float32 rows)
    blocks = resolve_dtype("auto", device, frozenset(flags), cuda_bf16, cpu_blocks=True)
    assert blocks[0] == ("float32" if device == "cpu" else expected)
    assert ("GGUF blocks" in blocks[1]) == (device == "cpu")


def test_dtype_auto_on_this_machine_follows_its_cpu_flags(tmp_path):
    """Read /proc/cpuinfo here, independently of the loader, and expect what it implies."""
    from splitserve.model.loader import cpu_flags, resolve_model_dtype

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags = {f for line in text.splitlines() if line.split(":")[0].strip() == "flags"
             for f in line.split(":", 1)[1].split()}
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert cpu_flags() == frozenset(flags)
    chosen, why = resolve_model_dtype("auto", "cpu", str(tmp_path))  # not a GGUF file: the flags decide
    assert chosen == ("bfloat16" if native else "float32"), why
    # the default model is Q4_1 blocks: float32 wherever the block kernels are built
    from splitserve.kernels import cpu_quant

    chosen, why = resolve_model_dtype("auto", "cpu")
    assert chosen == ("float32" if cpu_quant.available() or not native else "bfloat16"), why


def test_cpu_flags_parse_every_flags_line():
    from splitserve.model.loader import cpu_flags

    text = "processor\t: 0\nflags\t\t: fpu avx2 fma\nbugs\t: spectre\n\nprocessor\t: 1\nflags\t: fpu amx_bf16\n"
    assert cpu_flags(text) == {"fpu", "avx2", "fma", "amx_bf16"}
    assert cpu_flags("model name : avx512_bf16 lookalike\n") == frozenset()  # only the flags lines count


def test_bad_dtype_names_the_choices():
    from splitserve.config.engine import ModelConfig

    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        ModelConfig(dtype="fp8")
