"""deploy/ without a cluster or a Docker engine: every manifest parses, probes hit real gateway
endpoints, ports match the mounted config, that config passes `gateway check-config`, images are
pinned, selectors match, referenced files exist, and the image is small, non-root and healthy.

Each check is a function returning a list of problems, so the tests at the end can feed it a
broken copy of a manifest and show that it fails.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any, Final
from urllib.parse import urlsplit

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway import app as gateway_app
from gateway.config import Config, parse_config
from gateway.state import State

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "compose"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
NOT_IN_BASE = {"secret.example.yaml", "servicemonitor.yaml"}  # examples kept out of the kustomize base

Doc = dict[str, Any]


# ---------------------------------------------------------------- loading


def yaml_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def all_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def kustomization() -> Doc:
    return yaml_docs(K8S / "kustomization.yaml")[0]


def base_docs() -> list[Doc]:
    """Every object the kustomize base applies."""
    return [d for name in kustomization()["resources"] for d in yaml_docs(K8S / name)]


def one(docs: list[Doc], kind: str) -> Doc:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def configmap_gateway_yaml(docs: list[Doc]) -> str:
    return str(one(docs, "ConfigMap")["data"]["gateway.yaml"])


def parsed(text: str) -> Config:
    return parse_config(yaml.safe_load(text), env={})


def compose() -> Doc:
    return yaml_docs(COMPOSE / "docker-compose.yaml")[0]


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"])


def pod_containers(deploy: Doc) -> Iterator[Doc]:
    spec = deploy["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def main_container(deploy: Doc) -> Doc:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "gateway")


# ---------------------------------------------------------------- the Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_stages(instructions: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Stages with their resolved base image, name and instructions (global ARG defaults applied)."""
    args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for word, rest in instructions:
        if word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif word == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"image": image, "name": name, "body": []})
        elif stages:
            stages[-1]["body"].append((word, rest))
    return stages


def exec_form(rest: str) -> list[str] | None:
    try:
        value = json.loads(rest)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def dockerfile_problems(text: str) -> list[str]:
    problems: list[str] = []
    stages = dockerfile_stages(dockerfile_instructions(text))
    if len(stages) < 2:
        return ["not multi-stage: a builder stage and a runtime stage are expected"]
    for s in stages:
        problems += [f"FROM {s['image']}: {p}" for p in image_problems(s["image"])]
    final = stages[-1]
    body = final["body"]
    names = {s["name"] for s in stages[:-1] if s["name"]}
    if not any(w == "COPY" and any(f"--from={n}" in r for n in names) for w, r in body):
        problems.append("the runtime stage copies nothing from a builder stage")
    users = [r for w, r in body if w == "USER"]
    if not users:
        problems.append("the runtime stage has no USER (it would run as root)")
    else:
        uid = users[-1].split(":")[0]
        if not uid.isdigit() or int(uid) == 0:
            problems.append(f"USER {users[-1]}: must be a numeric non-zero uid (runAsNonRoot needs a number)")
    entry = [exec_form(r) for w, r in body if w == "ENTRYPOINT"]
    if not entry or entry[-1] != ["gateway"]:
        problems.append('ENTRYPOINT must be ["gateway"] (exec form)')
    cmd = [exec_form(r) for w, r in body if w == "CMD"]
    if not cmd or not cmd[-1] or cmd[-1][0] != "serve" or "-c" not in cmd[-1]:
        problems.append('CMD must be ["serve", "-c", FILE]')
    checks = [r for w, r in body if w == "HEALTHCHECK"]
    if not checks or "CMD" not in checks[-1] or "/health" not in checks[-1]:
        problems.append("no HEALTHCHECK against /health in the runtime stage")
    return problems


def dockerfile_user(text: str) -> int:
    body = dockerfile_stages(dockerfile_instructions(text))[-1]["body"]
    return int([r for w, r in body if w == "USER"][-1].split(":")[0])


def dockerfile_config_path(text: str) -> str:
    body = dockerfile_stages(dockerfile_instructions(text))[-1]["body"]
    cmd = [exec_form(r) for w, r in body if w == "CMD"][-1]
    assert cmd is not None
    return cmd[cmd.index("-c") + 1]


def healthcheck_url(text: str) -> str:
    body = dockerfile_stages(dockerfile_instructions(text))[-1]["body"]
    check = [r for w, r in body if w == "HEALTHCHECK"][-1]
    match = re.search(r"http://[\w.\[\]:-]+(/[\w/-]*)", check)
    assert match, check
    return match.group(0)


# ---------------------------------------------------------------- images


def image_problems(ref: str) -> list[str]:
    """An image must name an exact version: a digest, or a tag that is not `latest`."""
    if "$" in ref:
        return [f"{ref}: unresolved variable"]
    if re.search(r"@sha256:[0-9a-f]{64}$", ref):
        return []
    last = ref.rsplit("/", 1)[-1]
    if ":" not in last:
        return [f"{ref}: no tag (means latest)"]
    tag = last.split(":", 1)[1]
    if not tag or tag == "latest" or not re.search(r"\d", tag):
        return [f"{ref}: tag {tag!r} is not an exact version"]
    return []


def k8s_images(docs: list[Doc]) -> list[str]:
    return [c["image"] for d in docs if d.get("kind") == "Deployment" for c in pod_containers(d)]


def compose_images(doc: Doc) -> list[str]:
    return [svc["image"] if "image" in svc else f"<service {name} has no image>"
            for name, svc in doc["services"].items()]


# ---------------------------------------------------------------- Kubernetes


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_number(container: Doc, port: int | str) -> int | None:
    if isinstance(port, int):
        return port if any(p["containerPort"] == port for p in container.get("ports", [])) else None
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def deployment_security_problems(deploy: Doc) -> list[str]:
    problems: list[str] = []
    pod = deploy["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        problems.append("pod securityContext.runAsNonRoot must be true")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("pod seccompProfile must be RuntimeDefault")
    if psc.get("runAsUser") == 0:
        problems.append("pod runs as uid 0")
    for c in pod_containers(deploy):
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{c['name']}: readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']}: allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{c['name']}: capabilities must drop ALL")
        if sc.get("runAsUser") == 0 or sc.get("privileged"):
            problems.append(f"{c['name']}: runs privileged or as root")
        if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits"):
            problems.append(f"{c['name']}: resources need requests and limits")
    return problems


def probe_problems(deploy: Doc, app: web.Application) -> list[str]:
    """Probes: readiness on /ready, liveness on /health, a startup probe; each on a declared port
    and a path the gateway really serves with that handler (not the data path's catch-all)."""
    problems: list[str] = []
    c = main_container(deploy)
    wanted = {"readinessProbe": gateway_app.ready, "livenessProbe": gateway_app.health,
              "startupProbe": None}
    for key, handler in wanted.items():
        probe = c.get(key)
        if not probe or "httpGet" not in probe:
            problems.append(f"{key}: missing or not an httpGet probe")
            continue
        get = probe["httpGet"]
        if port_number(c, get["port"]) is None:
            problems.append(f"{key}: port {get['port']!r} is not a container port")
        found = route_handler(app, get["path"])
        if found is None or found is gateway_app.proxy_handler:
            problems.append(f"{key}: {get['path']} is not a gateway endpoint")
        elif handler is not None and found is not handler:
            problems.append(f"{key}: {get['path']} is served by {found.__name__}, expected {handler.__name__}")
    return problems


def shutdown_seconds(cfg: Config) -> tuple[float, float]:
    """(delay, drain timeout) after SIGTERM: `shutdown` in the config where this version has it,
    else the fixed 30 s drain of gateway.server."""
    shutdown = getattr(cfg, "shutdown", None)
    if shutdown is not None:
        return float(shutdown.delay), float(shutdown.drain_timeout)
    import gateway.server

    return 0.0, float(getattr(gateway.server, "DRAIN_TIMEOUT", 30.0))


def lifecycle_problems(deploy: Doc, cfg: Config) -> list[str]:
    problems: list[str] = []
    pod = deploy["spec"]["template"]["spec"]
    pre = main_container(deploy).get("lifecycle", {}).get("preStop", {})
    sleep = 0.0
    if "exec" in pre and pre["exec"]["command"][:1] == ["sleep"]:
        sleep = float(pre["exec"]["command"][1])
    elif "sleep" in pre:
        sleep = float(pre["sleep"]["seconds"])
    if sleep <= 0:
        problems.append("no preStop sleep: load balancers need a moment to move away before SIGTERM")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    delay, drain = shutdown_seconds(cfg)
    if grace <= sleep + delay + drain:
        problems.append(f"terminationGracePeriodSeconds {grace} must exceed preStop {sleep} + shutdown delay "
                        f"{delay} + drain {drain}")
    tmp = [m for c in pod_containers(deploy) for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if not tmp or any("emptyDir" not in volumes.get(m["name"], {}) for m in tmp):
        problems.append("/tmp must be an emptyDir (the root filesystem is read-only)")
    return problems


def config_mount_problems(docs: list[Doc]) -> list[str]:
    """The -c path of every container is gateway.yaml of the ConfigMap, mounted as a directory
    (a subPath mount would never see updates, so hot reload would not work)."""
    problems: list[str] = []
    deploy, cm = one(docs, "Deployment"), one(docs, "ConfigMap")
    volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
    for c in pod_containers(deploy):
        args = c.get("args", [])
        if "-c" not in args:
            problems.append(f"{c['name']}: no -c CONFIG argument")
            continue
        path = PurePosixPath(args[args.index("-c") + 1])
        mounts = [m for m in c.get("volumeMounts", []) if PurePosixPath(m["mountPath"]) == path.parent]
        if not mounts or "subPath" in mounts[0]:
            problems.append(f"{c['name']}: {path.parent} is not a directory mount")
            continue
        source = volumes.get(mounts[0]["name"], {}).get("configMap", {})
        if source.get("name") != cm["metadata"]["name"] or path.name not in cm["data"]:
            problems.append(f"{c['name']}: {path} is not {path.name} of ConfigMap {cm['metadata']['name']}")
    return problems


def database_secret_problems(docs: list[Doc], secret: Doc) -> list[str]:
    problems: list[str] = []
    want = (secret["metadata"]["name"], next(iter(secret.get("stringData") or secret.get("data") or {}), None))
    for c in pod_containers(one(docs, "Deployment")):
        env = {e["name"]: e for e in c.get("env", [])}
        ref = env.get("GATEWAY_DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
        if (ref.get("name"), ref.get("key")) != want:
            problems.append(f"{c['name']}: GATEWAY_DATABASE_URL must come from Secret {want[0]} key {want[1]}")
    if any(d.get("kind") == "Secret" for d in docs):
        problems.append("a Secret is part of the base: credentials do not belong in Git")
    return problems


def wiring_problems(docs: list[Doc]) -> list[str]:
    """Service, PDB, HPA and ServiceMonitor all find the Deployment's pods, and the ports line up."""
    problems: list[str] = []
    deploy, svc = one(docs, "Deployment"), one(docs, "Service")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    if not selector_matches(deploy["spec"]["selector"]["matchLabels"], labels):
        problems.append("the Deployment's selector does not match its own pod labels")
    if not selector_matches(svc["spec"]["selector"], labels):
        problems.append("the Service does not select the Deployment's pods")
    c = main_container(deploy)
    for p in svc["spec"]["ports"]:
        if port_number(c, p.get("targetPort", p["port"])) is None:
            problems.append(f"Service port {p['name']}: targetPort {p.get('targetPort')!r} is not a container port")
    if "metrics" not in {p["name"] for p in svc["spec"]["ports"]}:
        problems.append("the Service has no port named metrics")
    for d in docs:
        if d.get("kind") == "PodDisruptionBudget":
            if not selector_matches(d["spec"]["selector"]["matchLabels"], labels):
                problems.append("the PodDisruptionBudget does not select the Deployment's pods")
            if "minAvailable" not in d["spec"] and "maxUnavailable" not in d["spec"]:
                problems.append("the PodDisruptionBudget sets neither minAvailable nor maxUnavailable")
        if d.get("kind") == "HorizontalPodAutoscaler":
            ref = d["spec"]["scaleTargetRef"]
            if d["apiVersion"] != "autoscaling/v2":
                problems.append("the HorizontalPodAutoscaler must be autoscaling/v2")
            if (ref["kind"], ref["name"]) != ("Deployment", deploy["metadata"]["name"]):
                problems.append("the HorizontalPodAutoscaler does not target the Deployment")
            if d["spec"].get("minReplicas", 1) < 2:
                problems.append("the HorizontalPodAutoscaler may scale to a single replica")
            if not any(m.get("resource", {}).get("name") == "cpu" for m in d["spec"].get("metrics", [])):
                problems.append("the HorizontalPodAutoscaler does not scale on CPU")
        if d.get("kind") == "ServiceMonitor":
            if not selector_matches(d["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"]):
                problems.append("the ServiceMonitor does not select the Service")
            for ep in d["spec"]["endpoints"]:
                if ep["port"] not in {p["name"] for p in svc["spec"]["ports"]}:
                    problems.append(f"the ServiceMonitor scrapes port {ep['port']!r}, which the Service lacks")
    return problems


def listen_port_problems(cfg: Config, container: Doc) -> list[str]:
    problems: list[str] = []
    for attr, name in (("listen", "http"), ("metrics_listen", "metrics")):
        addr = getattr(cfg, attr)
        if addr is None:
            problems.append(f"{attr} is not set, but the container declares port {name!r}")
            continue
        host, port = addr
        if host not in ("0.0.0.0", "::"):
            problems.append(f"{attr}: {host} is unreachable from outside the pod; listen on 0.0.0.0")
        if port_number(container, name) != port:
            problems.append(f"container port {name!r} is {port_number(container, name)}, {attr} says {port}")
    return problems


# ---------------------------------------------------------------- Compose


def compose_problems(doc: Doc) -> list[str]:
    problems: list[str] = []
    services = doc["services"]
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = (vol if isinstance(vol, str) else vol.get("source", "")).split(":")[0]
            if source.startswith((".", "/")) and not (COMPOSE / source).exists():
                problems.append(f"{name}: mounts {source}, which does not exist")
        build = svc.get("build")
        if build:
            context = COMPOSE / build["context"]
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                problems.append(f"{name}: build file {build.get('dockerfile')} not found in {context}")
        for dep in svc.get("depends_on", []):
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
    gw = services.get("gateway", {})
    mounted = [v for v in gw.get("volumes", []) if isinstance(v, str) and v.split(":")[0] == "./gateway.yaml"]
    if not mounted or mounted[0].split(":")[1] != dockerfile_config_path(DOCKERFILE.read_text(encoding="utf-8")):
        problems.append("gateway: ./gateway.yaml is not mounted where the image's CMD reads its config")
    graf = services.get("grafana", {}).get("environment", {})
    if str(graf.get("GF_DATAPROXY_SEND_USER_HEADER", "")).lower() != "true":
        problems.append("grafana: GF_DATAPROXY_SEND_USER_HEADER must be true")
    return problems


def compose_tenancy_problems(doc: Doc, gateway_cfg: Config) -> list[str]:
    """Backends multi-tenant; where the gateway sends LBAC headers the backend enforces them."""
    problems: list[str] = []
    services = doc["services"]

    def config_of(name: str) -> Doc:
        for vol in services[name].get("volumes", []):
            if isinstance(vol, str) and vol.split(":")[0].endswith(f"{name}.yaml"):
                return yaml_docs(COMPOSE / vol.split(":")[0])[0]
        return {}

    mimir, loki, tempo = config_of("mimir"), config_of("loki"), config_of("tempo")
    if mimir.get("multitenancy_enabled") is not True:
        problems.append("mimir: multitenancy_enabled must be true")
    if loki.get("auth_enabled") is not True:
        problems.append("loki: auth_enabled must be true")
    if tempo.get("multitenancy_enabled") is not True:
        problems.append("tempo: multitenancy_enabled must be true")
    mimir_cmd = services["mimir"].get("command", [])
    mimir_cmd = shlex.split(mimir_cmd) if isinstance(mimir_cmd, str) else mimir_cmd
    # header/auto say the backend is meant to enforce X-Prom-Label-Policy (the probe verifies it at run time)
    if (gateway_cfg.upstreams["metrics"].lbac in ("header", "auto")
            and "-auth.label-access-control-enabled=true" not in mimir_cmd):
        problems.append("metrics: lbac header/auto, but Mimir runs without -auth.label-access-control-enabled=true")
    if gateway_cfg.upstreams["logs"].lbac in ("header", "auto") and loki.get("lbac", {}).get("enabled") is not True:
        problems.append("logs: lbac header/auto, but Loki runs without lbac.enabled: true")
    return problems


def upstream_problems(doc: Doc, cfg: Config) -> list[str]:
    """Every upstream URL of the Compose gateway names a Compose service."""
    problems: list[str] = []
    for sig, up in cfg.upstreams.items():
        for role, url in up.urls.items():
            host = url.split("//", 1)[1].split("/")[0].split(":")[0]
            if host not in doc["services"]:
                problems.append(f"upstreams.{sig} ({role}): {host} is not a Compose service")
    return problems


def datasource_problems(doc: Doc, listen_port: int) -> list[str]:
    problems: list[str] = []
    for ds in doc["datasources"]:
        url = ds["url"]
        if not url.startswith(f"http://gateway:{listen_port}"):
            problems.append(f"{ds['name']}: {url} does not go through the gateway")
        if ds.get("basicAuth") is not True or not ds.get("basicAuthUser") \
                or "basicAuthPassword" not in ds.get("secureJsonData", {}):
            problems.append(f"{ds['name']}: needs Basic auth (tenant as user, token as password)")
    return problems


# ---------------------------------------------------------------- Grafana data sources against the README

README = ROOT / "README.md"
PROVISIONING = COMPOSE / "grafana" / "provisioning" / "datasources" / "gateway.yaml"
# The README table's rows by the provisioned data source type they describe.
TABLE_ROWS: Final = {"prometheus": "Prometheus (Mimir)", "loki": "Loki", "tempo": "Tempo",
                     "alertmanager": "Alertmanager"}


def render_provisioning(text: str, env: dict[str, str]) -> Doc:
    """The file as Grafana reads it: ``$VAR`` and ``${VAR}`` expanded from the environment first."""
    expanded = re.sub(r"\$(?:\{(\w+)\}|(\w+))", lambda m: env.get(m.group(1) or m.group(2), ""), text)
    return dict(yaml.safe_load(expanded))


def compose_env() -> dict[str, str]:
    """The variables .env.example gives the grafana service (a token stands in for the empty one)."""
    env: dict[str, str] = {}
    for line in (COMPOSE / ".env.example").read_text(encoding="utf-8").splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            env[name.strip()] = value.strip() or "glc_example"
    return env


def readme_datasource_table(text: str) -> dict[str, dict[str, str]]:
    """The "| data source | URL | token scopes | settings |" table: row name -> URL path, settings."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| data source | URL |"))
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        name, url, _scopes, settings = (c.strip() for c in line.strip("|").split("|")[:4])
        found = re.search(r"`(http://[^`]+)`", url)
        assert found, f"README table row {name!r} names no URL"
        rows[name] = {"path": urlsplit(found.group(1)).path, "settings": settings}
    return rows


def readme_provisioning_example(text: str) -> dict[str, Doc]:
    """The README's "Provisioned, for stack 100" YAML, by data source type."""
    block = text.split("Provisioned, for stack 100:", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    return {d["type"]: d for d in yaml.safe_load(block)["datasources"]}


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{key}" if prefix else key).items()}


def readme_datasource_problems(provisioned: Doc, readme: str) -> list[str]:
    """Each provisioned data source on the README table's base URL path, with the jsonData the README's
    provisioning example and the table's settings give (`jsonData.x: {...}` there) for its type."""
    table, example = readme_datasource_table(readme), readme_provisioning_example(readme)
    by_uid = {d.get("uid"): d for d in provisioned["datasources"]}
    problems: list[str] = []
    for ds in provisioned["datasources"]:
        row = table.get(TABLE_ROWS.get(ds["type"], ""))
        if row is None:
            problems.append(f"{ds['name']}: type {ds['type']} has no row in the README's data source table")
            continue
        if urlsplit(ds["url"]).path != row["path"]:
            problems.append(f"{ds['name']}: URL path {urlsplit(ds['url']).path!r}, the README says {row['path']!r}")
        want = _leaves(example.get(ds["type"], {}).get("jsonData", {}))
        for fragment in re.findall(r"`jsonData\.([\w.]+): (\{[^`]*\}|[^`]+)`", row["settings"]):
            want.update(_leaves(yaml.safe_load(fragment[1]), fragment[0]))
        have = _leaves(ds.get("jsonData", {}))
        for key, value in want.items():
            if key.endswith("datasourceUid"):  # names another data source: the same type as the README's
                wanted_type = next((t for t, d in example.items() if d.get("uid") == value), None)
                if by_uid.get(have.get(key), {}).get("type") != wanted_type:
                    problems.append(f"{ds['name']}: jsonData.{key} must name the {wanted_type} data source")
            elif have.get(key) != value:
                problems.append(f"{ds['name']}: jsonData.{key} is {have.get(key)!r}, the README says {value!r}")
    return problems


# ---------------------------------------------------------------- the gateway's own routes


def stub_state(cfg: Config, draining: bool = False) -> State:
    cache = SimpleNamespace(loaded=True, stale=False, db_ok=True, detail="ok", age=0.5, policies={}, tokens={})
    return State(cfg, None, cache, draining=draining)  # type: ignore[arg-type]


def route_handler(app: web.Application, path: str) -> Any:
    """The handler the gateway's router picks for GET path, resolved without starting anything."""
    for resource in app.router.resources():
        info = resource.get_info()
        if info.get("path") == path or info.get("formatter") == path:
            for route in resource:
                if route.method in ("GET", "*"):
                    return route.handler
    for resource in app.router.resources():
        if resource.canonical == "/{tail}":
            return gateway_app.proxy_handler
    return None


# ================================================================= tests


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = yaml_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs)


def test_kustomization_lists_files_that_exist_and_leaves_examples_out() -> None:
    k = kustomization()
    assert k["kind"] == "Kustomization"
    missing = [r for r in k["resources"] if not (K8S / r).is_file()]
    assert missing == []
    assert not NOT_IN_BASE & set(k["resources"])
    for name in NOT_IN_BASE:
        assert (K8S / name).is_file()
    kinds = {d["kind"] for d in base_docs()}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds


def test_deployment_shape() -> None:
    deploy = one(base_docs(), "Deployment")
    assert deploy["spec"]["replicas"] == 3
    init = deploy["spec"]["template"]["spec"]["initContainers"]
    assert [c["args"][0] for c in init] == ["migrate"]
    assert init[0]["image"] == main_container(deploy)["image"]
    assert main_container(deploy)["args"][0] == "serve"


def test_deployment_is_non_root_read_only_and_bounded() -> None:
    deploy = one(base_docs(), "Deployment")
    assert deployment_security_problems(deploy) == []
    uid = deploy["spec"]["template"]["spec"]["securityContext"].get("runAsUser")
    assert uid in (None, dockerfile_user(DOCKERFILE.read_text(encoding="utf-8")))


def test_probes_point_at_real_gateway_endpoints() -> None:
    docs = base_docs()
    app = gateway_app.build_app(stub_state(parsed(configmap_gateway_yaml(docs))))
    assert probe_problems(one(docs, "Deployment"), app) == []


async def test_probe_endpoints_answer_as_probes_expect() -> None:
    cfg = parsed(configmap_gateway_yaml(base_docs()))
    for draining, ready_status in ((False, 200), (True, 503)):
        app = gateway_app.build_app(stub_state(cfg, draining=draining))
        for path, want in (("/health", 200), ("/ready", ready_status)):
            request = make_mocked_request("GET", path, app=app)
            response = await route_handler(app, path)(request)
            assert response.status == want, (path, draining)


def test_metrics_port_serves_metrics() -> None:
    docs = base_docs()
    cfg = parsed(configmap_gateway_yaml(docs))
    assert cfg.metrics_listen is not None
    state = stub_state(cfg)
    assert route_handler(gateway_app.build_metrics_app(state), "/metrics") is gateway_app.metrics
    # With metrics_listen set, /metrics is not on the main port (the ServiceMonitor must use "metrics").
    assert route_handler(gateway_app.build_app(state), "/metrics") is gateway_app.proxy_handler
    monitor = yaml_docs(K8S / "servicemonitor.yaml")[0]
    assert {ep["path"] for ep in monitor["spec"]["endpoints"]} == {"/metrics"}
    assert wiring_problems([*docs, monitor]) == []


def test_container_ports_match_the_mounted_config() -> None:
    docs = base_docs()
    cfg = parsed(configmap_gateway_yaml(docs))
    assert listen_port_problems(cfg, main_container(one(docs, "Deployment"))) == []
    assert config_mount_problems(docs) == []


def test_graceful_shutdown_settings() -> None:
    docs = base_docs()
    assert lifecycle_problems(one(docs, "Deployment"), parsed(configmap_gateway_yaml(docs))) == []


def test_service_pdb_hpa_target_the_deployment() -> None:
    assert wiring_problems(base_docs()) == []


def test_database_url_comes_from_the_example_secret() -> None:
    secret = yaml_docs(K8S / "secret.example.yaml")[0]
    assert secret["kind"] == "Secret"
    assert database_secret_problems(base_docs(), secret) == []
    assert parsed(configmap_gateway_yaml(base_docs())).database.url is None  # nothing secret in the ConfigMap


def check_config(text: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)


def test_mounted_configs_pass_check_config(tmp_path: Path) -> None:
    k8s = check_config(configmap_gateway_yaml(base_docs()), tmp_path, "k8s.yaml")
    assert k8s.returncode == 0, k8s.stderr
    local = check_config((COMPOSE / "gateway.yaml").read_text(encoding="utf-8"), tmp_path, "compose.yaml")
    assert local.returncode == 0, local.stderr
    broken = check_config("listen: nowhere\nbogus: 1\n", tmp_path, "broken.yaml")  # the check can fail
    assert broken.returncode == 1 and "bogus" in broken.stderr


def test_every_image_is_pinned() -> None:
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    images = k8s_images(base_docs()) + compose_images(compose())
    images += [s["image"] for s in dockerfile_stages(dockerfile_instructions(dockerfile))]
    assert [p for ref in images for p in image_problems(ref)] == []
    version = project_version()
    own = [ref for ref in images if ref.rsplit("/", 1)[-1].startswith("access-policy-gateway:")]
    assert own and all(ref.endswith(f":{version}") for ref in own), own
    assert all(i.get("newTag") == version for i in kustomization().get("images", []))


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert dockerfile_problems(text) == []
    url = healthcheck_url(text)
    cfg = parsed((COMPOSE / "gateway.yaml").read_text(encoding="utf-8"))
    assert url.startswith(f"http://127.0.0.1:{cfg.listen[1]}/")
    path = "/" + url.split("/", 3)[3]
    assert route_handler(gateway_app.build_app(stub_state(cfg)), path) is gateway_app.health
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    assert "*" in ignore and {"!gateway/", "!pyproject.toml", "!README.md"} <= set(ignore)


def test_the_wheel_carries_every_data_file_the_gateway_reads() -> None:
    """The image installs a wheel, and a wheel holds only the package data pyproject.toml lists:
    a template or static file outside those globs is missing in the container."""
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"]["gateway"]
    package = ROOT / "gateway"
    missing = sorted(str(p.relative_to(package)) for p in package.rglob("*")
                     if p.is_file() and p.suffix not in (".py", ".pyc", ".pyi") and "__pycache__" not in p.parts
                     and not any(fnmatch.fnmatch(str(p.relative_to(package)), g) for g in globs))
    assert missing == [], f"add to [tool.setuptools.package-data] gateway: {missing}"


def test_compose_services_and_files() -> None:
    doc = compose()
    assert {"postgres", "mimir", "loki", "tempo", "gateway", "grafana"} <= set(doc["services"])
    assert compose_problems(doc) == []
    cfg = parsed((COMPOSE / "gateway.yaml").read_text(encoding="utf-8"))
    assert compose_tenancy_problems(doc, cfg) == []
    assert upstream_problems(doc, cfg) == []
    ports = [str(p) for p in doc["services"]["gateway"]["ports"]]
    assert any(p.rsplit(":", 1)[-1] == str(cfg.listen[1]) for p in ports), ports
    assert cfg.listen[0] == "0.0.0.0"


def test_grafana_data_sources_go_through_the_gateway() -> None:
    ds = yaml_docs(COMPOSE / "grafana" / "provisioning" / "datasources" / "gateway.yaml")[0]
    assert {d["type"] for d in ds["datasources"]} == {"prometheus", "loki", "tempo"}
    cfg = parsed((COMPOSE / "gateway.yaml").read_text(encoding="utf-8"))
    assert datasource_problems(ds, cfg.listen[1]) == []
    env = compose()["services"]["grafana"]["environment"]
    assert {"GATEWAY_TENANT", "GATEWAY_READ_TOKEN"} <= set(env)


def test_compose_data_sources_match_the_readme_table() -> None:
    """Rendered as Grafana reads it, each data source is on the pinned base URL the README's table gives
    for its type (/mimir/prometheus, /loki, /tempo) with the README's settings (Tempo streaming off)."""
    provisioned = render_provisioning(PROVISIONING.read_text(encoding="utf-8"), compose_env())
    assert str(provisioned["datasources"][0]["basicAuthUser"]) == "100"  # rendered, not the ${...} text
    readme = README.read_text(encoding="utf-8")
    assert set(readme_datasource_table(readme)) >= set(TABLE_ROWS.values())
    assert readme_datasource_problems(provisioned, readme) == []


# ---------------------------------------------------------------- the checks can fail


def test_checks_catch_broken_kubernetes_manifests() -> None:
    docs = base_docs()
    deploy = one(docs, "Deployment")
    app = gateway_app.build_app(stub_state(parsed(configmap_gateway_yaml(docs))))

    def broken(mutate: Any) -> Doc:
        d = copy.deepcopy(deploy)
        mutate(d)
        return d

    pod = lambda d: d["spec"]["template"]["spec"]  # noqa: E731
    main = main_container

    def rw_fs(d: Doc) -> None:
        main(d)["securityContext"]["readOnlyRootFilesystem"] = False

    def root(d: Doc) -> None:
        pod(d)["securityContext"]["runAsNonRoot"] = False

    def caps(d: Doc) -> None:
        pod(d)["initContainers"][0]["securityContext"]["capabilities"] = {}

    assert deployment_security_problems(broken(rw_fs))
    assert deployment_security_problems(broken(root))
    assert deployment_security_problems(broken(caps))

    def bad_path(d: Doc) -> None:
        main(d)["readinessProbe"]["httpGet"]["path"] = "/readyz"

    def swapped(d: Doc) -> None:
        main(d)["livenessProbe"]["httpGet"]["path"] = "/ready"

    def bad_port(d: Doc) -> None:
        main(d)["livenessProbe"]["httpGet"]["port"] = "web"

    assert probe_problems(broken(bad_path), app)
    assert probe_problems(broken(swapped), app)
    assert probe_problems(broken(bad_port), app)

    def short_grace(d: Doc) -> None:
        pod(d)["terminationGracePeriodSeconds"] = 30

    def no_prestop(d: Doc) -> None:
        del main(d)["lifecycle"]

    cfg = parsed(configmap_gateway_yaml(docs))
    assert lifecycle_problems(broken(short_grace), cfg)
    assert lifecycle_problems(broken(no_prestop), cfg)

    def relabel(d: Doc) -> None:
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "proxy"

    assert wiring_problems([broken(relabel) if x is deploy else x for x in docs])
    hpa = copy.deepcopy(one(docs, "HorizontalPodAutoscaler"))
    hpa["spec"]["scaleTargetRef"]["name"] = "other"
    assert wiring_problems([hpa if x.get("kind") == "HorizontalPodAutoscaler" else x for x in docs])

    def other_port(d: Doc) -> None:
        main(d)["ports"][0]["containerPort"] = 8000

    assert listen_port_problems(cfg, main(broken(other_port)))
    loopback = parsed(configmap_gateway_yaml(docs).replace("listen: 0.0.0.0:8080", "listen: 127.0.0.1:8080"))
    assert listen_port_problems(loopback, main(deploy))

    def plain_env(d: Doc) -> None:
        main(d)["env"] = [{"name": "GATEWAY_DATABASE_URL", "value": "postgresql://x/y"}]

    secret = yaml_docs(K8S / "secret.example.yaml")[0]
    assert database_secret_problems([broken(plain_env) if x is deploy else x for x in docs], secret)

    def sub_path(d: Doc) -> None:
        main(d)["volumeMounts"][0]["subPath"] = "gateway.yaml"

    assert config_mount_problems([broken(sub_path) if x is deploy else x for x in docs])


def test_checks_catch_broken_images_dockerfiles_and_compose() -> None:
    for ref in ("python", "python:latest", "grafana/grafana", "registry:5000/app", "img:${TAG}", "x:stable"):
        assert image_problems(ref), ref
    for ref in ("python:3.11.13-slim-bookworm", "registry:5000/app:1.2.3", "a/b@sha256:" + "0" * 64):
        assert image_problems(ref) == [], ref

    text = DOCKERFILE.read_text(encoding="utf-8")
    assert dockerfile_problems(text.replace("USER 10001:10001", "USER gateway"))
    assert dockerfile_problems(text.replace("USER 10001:10001", "USER 0"))
    assert dockerfile_problems(text.replace("HEALTHCHECK", "# HEALTHCHECK"))
    assert dockerfile_problems(text.replace('ENTRYPOINT ["gateway"]', "ENTRYPOINT gateway"))
    assert dockerfile_problems(re.sub(r"(?m)^ARG PYTHON_IMAGE=.*$", "ARG PYTHON_IMAGE=python:latest", text))
    single = "FROM python:3.11.13-slim-bookworm\nUSER 1000\nENTRYPOINT [\"gateway\"]\n"
    assert dockerfile_problems(single)

    doc = compose()
    bad = copy.deepcopy(doc)
    bad["services"]["loki"]["volumes"][0] = "./nope.yaml:/etc/loki/loki.yaml:ro"
    assert compose_problems(bad)
    bad = copy.deepcopy(doc)
    bad["services"]["grafana"]["environment"]["GF_DATAPROXY_SEND_USER_HEADER"] = "false"
    assert compose_problems(bad)
    bad = copy.deepcopy(doc)
    bad["services"]["mimir"]["command"] = [c for c in bad["services"]["mimir"]["command"] if "label-access" not in c]
    cfg = parsed((COMPOSE / "gateway.yaml").read_text(encoding="utf-8"))
    assert compose_tenancy_problems(bad, cfg)
    assert upstream_problems(doc, parsed((COMPOSE / "gateway.yaml").read_text(encoding="utf-8")
                                         .replace("http://loki:3100", "http://loki-gw:3100")))
    ds = yaml_docs(COMPOSE / "grafana" / "provisioning" / "datasources" / "gateway.yaml")[0]
    ds["datasources"][1]["url"] = "http://loki:3100"
    assert datasource_problems(ds, cfg.listen[1])

    readme = README.read_text(encoding="utf-8")
    good = render_provisioning(PROVISIONING.read_text(encoding="utf-8"), compose_env())
    for mutate in (lambda d: d[0].update(url="http://gateway:8080/prometheus"),  # what the example had
                   lambda d: d[1].update(url="http://gateway:8080"),
                   lambda d: d[2].update(url="http://gateway:8080"),
                   lambda d: d[2]["jsonData"].pop("streamingEnabled"),
                   lambda d: d[2]["jsonData"]["streamingEnabled"].update(metrics=True),
                   lambda d: d[2]["jsonData"]["serviceMap"].update(datasourceUid="gateway-loki")):
        bad = copy.deepcopy(good)
        mutate(bad["datasources"])
        assert readme_datasource_problems(bad, readme), mutate
