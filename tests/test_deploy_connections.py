"""deploy/ sizing and trust (issue 12, item 7): the worker count and database pool of the Compose and
Kubernetes examples fit PostgreSQL's connection limit, and Kubernetes trusts X-Forwarded-For only from
the ingress controller's addresses (not the pod range), with a NetworkPolicy keeping other pods off."""

from __future__ import annotations

import copy
from typing import Any

from tests.test_deploy import K8S, base_docs, compose, configmap_gateway_yaml, one, parsed, yaml_docs

PG_MAX_CONNECTIONS = 100  # PostgreSQL's default max_connections (the examples do not raise it)
PG_RESERVED = 3  # superuser_reserved_connections
CLI_RUNS = 1  # a concurrent `gateway token bootstrap` or `gateway migrate`, one pool of its own


def _workers(args: list[str]) -> int | None:
    """--workers N from a command line; None when absent (then: one per host core, unbounded)."""
    if "--workers" not in args:
        return None
    n = int(args[args.index("--workers") + 1])
    return n if n > 0 else None


def _per_process(pool_max: int) -> int:
    return pool_max + 1  # the pool, and the cache's LISTEN connection


def compose_connection_problems(doc: dict[str, Any], gateway_yaml: str) -> list[str]:
    cmd = doc["services"]["gateway"].get("command") or []
    workers = _workers([str(a) for a in cmd])
    if workers is None:
        return ["gateway: no explicit --workers N: it would start one worker per host core, each with a pool"]
    per = _per_process(parsed(gateway_yaml).database.pool_max)
    total = workers * per + CLI_RUNS * per
    if total > PG_MAX_CONNECTIONS - PG_RESERVED:
        return [f"{workers} workers x {per} + CLI {per} = {total} connections > {PG_MAX_CONNECTIONS - PG_RESERVED}"]
    return []


def k8s_connection_problems(docs: list[dict[str, Any]]) -> list[str]:
    deploy = one(docs, "Deployment")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    workers = _workers([str(a) for a in container.get("args", [])])
    if workers is None:
        return ["gateway container: no explicit --workers N"]
    hpa = one(docs, "HorizontalPodAutoscaler")
    surge = int(deploy["spec"]["strategy"]["rollingUpdate"]["maxSurge"])
    pods = int(hpa["spec"]["maxReplicas"]) + surge
    per = _per_process(parsed(configmap_gateway_yaml(docs)).database.pool_max)
    total = pods * workers * per + CLI_RUNS * per
    if total > PG_MAX_CONNECTIONS - PG_RESERVED:
        return [f"{pods} pods x {workers} workers x {per} + CLI {per} = {total} connections"
                f" > {PG_MAX_CONNECTIONS - PG_RESERVED}"]
    return []


def trust_problems(docs: list[dict[str, Any]]) -> list[str]:
    """trusted_proxies must be a few addresses (the ingress controller's), never a pod or node range."""
    problems = []
    for net in parsed(configmap_gateway_yaml(docs)).trusted_proxies:
        if net.num_addresses > 256:
            problems.append(f"trusted_proxies {net}: {net.num_addresses} addresses is a pod range, not an ingress")
    if not any(d.get("kind") == "NetworkPolicy" for d in docs):
        problems.append("no NetworkPolicy keeps other pods from connecting to the gateway")
    return problems


def test_compose_workers_and_pool_fit_postgres() -> None:
    assert compose_connection_problems(compose(), (K8S.parent / "compose" / "gateway.yaml").read_text()) == []


def test_kubernetes_pods_workers_and_pool_fit_postgres() -> None:
    assert k8s_connection_problems(base_docs()) == []


def test_kubernetes_trusts_only_the_ingress_controller() -> None:
    docs = base_docs()
    assert trust_problems(docs) == []
    policy = one(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"] == one(docs, "Deployment")["spec"]["selector"]
    allowed_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed_ports == {"http", "metrics"}
    assert "networkpolicy.yaml" in yaml_docs(K8S / "kustomization.yaml")[0]["resources"]


def test_the_checks_catch_what_the_examples_used_to_do() -> None:
    doc = copy.deepcopy(compose())
    doc["services"]["gateway"].pop("command")  # the image default: one worker per core
    assert compose_connection_problems(doc, (K8S.parent / "compose" / "gateway.yaml").read_text())
    docs = copy.deepcopy(base_docs())
    cm = one(docs, "ConfigMap")
    text = cm["data"]["gateway.yaml"]
    cm["data"]["gateway.yaml"] = text.replace("pool_max: 4", "pool_max: 10")  # 11 pods x 11 = 121
    assert k8s_connection_problems(docs)
    cm["data"]["gateway.yaml"] = text.replace("10.244.250.0/28", "10.244.0.0/16")  # the whole pod range
    assert trust_problems(docs)
