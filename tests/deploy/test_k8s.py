"""deploy/k8s/: each overlay renders with `kubectl kustomize` and every object validates against the
schemas of a pinned Kubernetes version (kubernetes-validate, strict: an unknown field fails); KEDA's
ScaledObject is a CRD those schemas lack, so its shape is checked here instead. Then what the
schemas cannot see: every container flag is a real flag of its role (parsed by the flags generated
from the role's config class, the one config source), the grace period covers the workers' drain
timeout, probes hit the gRPC health service on the port each role serves, Services and addresses
match, and the NetworkPolicies allow exactly the intended paths.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
from functools import cache

import pytest
from deploy_support import DEPLOY, exported_series, metric_names, recorded_series

yaml = pytest.importorskip("yaml")

K8S_VERSION = "1.31.0"  # the oldest Kubernetes these manifests are checked against (gRPC probes: GA in 1.27)
OVERLAYS = ("cpu", "gpu")
ROLES = ("gateway", "prefill", "decode", "kvstore")
DRAIN_MARGIN_S = 15  # terminationGracePeriodSeconds = --drain-timeout-s + this (deploy/k8s/base/prefill.yaml)
POD_IP = "10.1.2.3"  # what Kubernetes puts for $(POD_IP) in the args


@cache
def render(overlay: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (Debian package kubernetes-client; .ci/run installs it)")
    out = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return tuple(obj for obj in yaml.safe_load_all(out.stdout) if obj)


def objects(overlay: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in render(overlay) if o["kind"] == kind}


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def role_config(role: str, args: list[str]):
    """The config the role builds from these args, parsed by the flags of its config class."""
    from splitserve.config.flags import add_config_args, config_from_args
    from splitserve.config.launch import ROLE_CONFIGS

    assert args[0] == role, f"the {role} container runs `splitserve {args[0]}`"
    parser = argparse.ArgumentParser(prog=f"splitserve {role}", exit_on_error=False, allow_abbrev=False)
    add_config_args(parser, ROLE_CONFIGS[role])
    given = [a.replace("$(POD_IP)", POD_IP) for a in args[1:]]
    namespace, unknown = parser.parse_known_args(given)
    assert not unknown, f"{role}: not flags of {ROLE_CONFIGS[role].__name__}: {unknown}"
    return config_from_args(ROLE_CONFIGS[role], namespace)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_pinned_kubernetes(overlay):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) is missing")
    kinds = sorted(o["kind"] for o in render(overlay))
    assert kinds == sorted(["Namespace", "StatefulSet", *["Deployment"] * 4, *["Service"] * 5,
                            *["PodDisruptionBudget"] * 3, *["NetworkPolicy"] * 6, *["ScaledObject"] * 2])
    for obj in render(overlay):
        if obj["kind"] == "ScaledObject":
            continue  # a CRD: test_scaled_objects checks it
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    broken = {**objects(overlay, "Deployment")["decode"], "spec": {"replica": 1}}  # the validator does fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    assert all(o["metadata"].get("namespace") == "splitserve" for o in render(overlay) if o["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_args_are_flags_of_the_role_config(overlay):
    deployments = objects(overlay, "Deployment")
    assert set(deployments) == set(ROLES)
    for role, deployment in deployments.items():
        config = role_config(role, container(deployment)["args"])
        assert config.host == "0.0.0.0", f"{role} must listen on the pod's address"
        if role in ("prefill", "decode", "kvstore"):
            assert config.metrics_port == 9090 and config.advertise_address.endswith(f":{config.port}")
    for wrong in (["--no-such-flag", "1"], ["--drain-timeout", "30"]):  # unknown; a prefix of a flag is none
        with pytest.raises(AssertionError, match="not flags of WorkerConfig"):
            role_config("decode", ["decode", *wrong])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_addresses_name_services_and_their_ports(overlay):
    services = objects(overlay, "Service")
    ports = {name: {p["port"] for p in s["spec"]["ports"]} for name, s in services.items()}
    for role, deployment in objects(overlay, "Deployment").items():
        config = role_config(role, container(deployment)["args"])
        host, port = config.redis_url.split("//")[1].split("/")[0].split(":")
        assert int(port) in ports[host], f"{role}: --redis-url {config.redis_url}"
        if role in ("prefill", "decode"):
            host, port = config.kvstore.split(":")
            assert int(port) in ports[host], f"{role}: --kvstore {config.kvstore}"
        if role == "gateway":
            assert config.discovers and not config.prefill and not config.decode, "the gateway discovers workers"
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = services[role]["spec"]["selector"]
        assert selector.items() <= labels.items(), f"Service {role} selects no {role} pod"
        named = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        for p in services[role]["spec"]["ports"]:
            assert named[p["targetPort"]] == p["port"], f"Service {role} port {p['name']}"
        if role != "gateway":
            assert named["grpc"] == config.port and named["metrics"] == config.metrics_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_grpc_health_service_on_the_role_port(overlay):
    for role, deployment in objects(overlay, "Deployment").items():
        c = container(deployment)
        config = role_config(role, c["args"])
        for probe in ("startupProbe", "livenessProbe") + (() if role == "gateway" else ("readinessProbe",)):
            assert c[probe]["grpc"] == {"port": config.port}, f"{role} {probe}"
        if role == "gateway":
            assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
            assert {p["name"]: p["containerPort"] for p in c["ports"]}["http"] == config.http_port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_role_gets_its_drain_timeout_before_it_is_killed(overlay):
    """Every role drains for up to its --drain-timeout-s after SIGTERM (workers: running calls;
    the gateway: its open streams; the kvstore: its leased blocks); the kubelet's SIGKILL comes
    terminationGracePeriodSeconds after SIGTERM, and a liveness probe that fails for the whole
    drain must not kill a worker first."""
    for role in ("prefill", "decode", "gateway", "kvstore"):
        deployment = objects(overlay, "Deployment")[role]
        c = container(deployment)
        drain = role_config(role, c["args"]).drain_timeout_s
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == drain + DRAIN_MARGIN_S, role
        if role in ("prefill", "decode"):
            live = c["livenessProbe"]
            assert live["periodSeconds"] * live["failureThreshold"] > drain


def test_the_drain_timeout_the_manifests_give_is_the_config_default():
    from splitserve.config.worker import WorkerConfig

    args = container(objects("cpu", "Deployment")["decode"])["args"]
    assert float(args[args.index("--drain-timeout-s") + 1]) == WorkerConfig().drain_timeout_s


def test_overlays_fit_their_hardware():
    for role in ("prefill", "decode"):
        cpu = container(objects("cpu", "Deployment")[role])
        assert role_config(role, cpu["args"]).torch_threads == int(cpu["resources"]["limits"]["cpu"])
        gpu = container(objects("gpu", "Deployment")[role])
        assert role_config(role, gpu["args"]).device == "cuda"
        assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and gpu["image"] == "splitserve:cuda"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_cover_gateway_and_workers(overlay):
    budgets = objects(overlay, "PodDisruptionBudget")
    pods = {r: d["spec"]["template"]["metadata"]["labels"] for r, d in objects(overlay, "Deployment").items()}
    for role in ("gateway", "prefill", "decode"):
        assert budgets[role]["spec"]["selector"]["matchLabels"].items() <= pods[role].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_objects(overlay):
    """KEDA ScaledObjects (a CRD: no schema in kubernetes-validate): decode on KV-cache usage, prefill
    on queue depth and TTFT, each on a Deployment of the render, with Prometheus queries that read
    series the code exports or the rules record."""
    scaled = objects(overlay, "ScaledObject")
    deployments = objects(overlay, "Deployment")
    known = exported_series() | recorded_series()
    wanted = {"decode": {"splitserve_kv_cache_usage_perc"},
              "prefill": {"splitserve:num_requests_waiting:sum", "splitserve:time_to_first_token_seconds:p99"}}
    for name, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        spec = obj["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments and spec["scaleTargetRef"]["name"] == name
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        read = set()
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") in ("AverageValue", "Value")
            meta = trigger["metadata"]
            assert meta["serverAddress"].startswith("http") and isinstance(meta["threshold"], str)
            float(meta["threshold"])
            read |= metric_names(meta["query"])
        assert read <= known and read == wanted[name], f"ScaledObject {name} reads {read}"


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", ()) if e["operator"] == "In")


def allowed(overlay: str, source: dict, target: dict, port: int) -> bool:
    """Whether the policies let a pod labelled `source` reach a pod labelled `target` on `port` (all
    pods in the namespace splitserve; a source with name prometheus counts as another namespace's)."""
    selecting = [p["spec"] for p in objects(overlay, "NetworkPolicy").values() if _selects(p["spec"]["podSelector"], target)]
    if not selecting:
        return True
    for spec in selecting:
        for rule in spec.get("ingress", ()):
            if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
                continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                in_other_namespace = source.get("app.kubernetes.io/name") == "prometheus"
                if "namespaceSelector" not in peer and in_other_namespace:
                    continue
                if _selects(peer.get("podSelector", {}), source):
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_allow_exactly_the_paths_the_roles_use(overlay):
    pods = {r: d["spec"]["template"]["metadata"]["labels"] for r, d in objects(overlay, "Deployment").items()}
    pods["redis"] = objects(overlay, "StatefulSet")["redis"]["spec"]["template"]["metadata"]["labels"]
    pods["other"] = {"app.kubernetes.io/name": "debug", "app.kubernetes.io/part-of": "splitserve"}
    pods["prometheus"] = {"app.kubernetes.io/name": "prometheus"}
    serves = {"gateway": (50051, 8000), "prefill": (50061,), "decode": (50062,), "kvstore": (50070,), "redis": (6379,)}
    may = {"gateway": set(pods), "prefill": {"gateway"}, "decode": {"gateway"}, "kvstore": {"prefill", "decode"},
           "redis": {"gateway", "prefill", "decode", "kvstore"}}
    for target, ports in serves.items():
        for port in ports:
            reached = {s for s in pods if s != target and allowed(overlay, pods[s], pods[target], port)}
            assert reached == may[target] - {target}, f"{target}:{port} reachable from {sorted(reached)}"
    for target in ("prefill", "decode", "kvstore"):  # metrics: Prometheus only
        reached = {s for s in pods if s != target and allowed(overlay, pods[s], pods[target], 9090)}
        assert reached == {"prometheus"}, f"{target}:9090 reachable from {sorted(reached)}"
