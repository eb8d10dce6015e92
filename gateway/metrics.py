"""The gateway's own Prometheus series, on /metrics."""

from __future__ import annotations

import os
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

REGISTRY: Final = CollectorRegistry(auto_describe=True)

REQUESTS: Final = Counter("gateway_requests_total", "Data-path requests by backend, scope and status code.",
                          ["backend", "scope", "code"], registry=REGISTRY)
REFUSALS: Final = Counter("gateway_auth_refusals_total", "Requests refused before forwarding, by reason.",
                          ["reason"], registry=REGISTRY)
UPSTREAM_SECONDS: Final = Histogram(
    "gateway_upstream_duration_seconds", "Time from sending upstream to the response headers.",
    ["backend"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
ADDED_SECONDS: Final = Histogram(
    "gateway_added_latency_seconds", "Time the gateway spends before forwarding (identify to send).",
    ["backend"], registry=REGISTRY,
    buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1))
IN_FLIGHT: Final = Gauge("gateway_in_flight_requests", "Data-path requests being served.", registry=REGISTRY,
                         multiprocess_mode="livesum")
CACHE_POLICIES: Final = Gauge("gateway_cache_policies", "Access policies in the snapshot.", registry=REGISTRY,
                              multiprocess_mode="livemax")
CACHE_TOKENS: Final = Gauge("gateway_cache_tokens", "Tokens in the snapshot.", registry=REGISTRY,
                            multiprocess_mode="livemax")
CACHE_AGE: Final = Gauge("gateway_cache_age_seconds", "Seconds since the snapshot was last confirmed.",
                         registry=REGISTRY, multiprocess_mode="livemax")
DB_UP: Final = Gauge("gateway_database_up", "1 when the policy database is reachable.", registry=REGISTRY,
                     multiprocess_mode="livemin")
RELOAD_OK: Final = Gauge("gateway_config_last_reload_successful", "1 if the last config reload succeeded.",
                         registry=REGISTRY, multiprocess_mode="livemin")
RELOAD_TIME: Final = Gauge("gateway_config_last_reload_success_timestamp_seconds",
                           "Time of the last successful config load.", registry=REGISTRY, multiprocess_mode="livemax")
LBAC_ENFORCES: Final = Gauge("gateway_lbac_backend_enforces",
                             "1 if the backend's last LBAC probe showed it enforces X-Prom-Label-Policy, 0 if it "
                             "ignores it, -1 if unknown or not probed (enforce mode).", ["backend"],
                             registry=REGISTRY, multiprocess_mode="livemin")
LBAC_HEADER_MODE: Final = Gauge("gateway_lbac_header_mode",
                                "1 if label-restricted reads to this backend use X-Prom-Label-Policy (header mode), "
                                "0 if the gateway rewrites them (enforce) or refuses them (unverified header).",
                                ["backend"], registry=REGISTRY, multiprocess_mode="livemin")
FORWARD_AUTH: Final = Counter("gateway_forward_auth_decisions_total",
                              "Forward-auth answers by caller kind (db-auth-gateway, nginx, ingress-nginx, traefik, "
                              "envoy) and outcome (allowed, or the refusal reason).", ["caller", "outcome"],
                              registry=REGISTRY)
FORWARD_AUTH_ENFORCES: Final = Gauge("gateway_forward_auth_backend_enforces",
                                     "1 if the backend behind the other proxy passed the label-policy probe, 0 if it "
                                     "failed it, -1 if unknown or not configured.", ["backend"],
                                     registry=REGISTRY, multiprocess_mode="livemin")
RELOAD_OK.set(1)


def exposition() -> bytes:
    """The text exposition; with several workers, the merged view of all of them."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def forget_process(pid: int) -> None:
    """Drop a process's live gauges from the merged view (issue 12): the supervising parent, which
    serves nothing and whose never-set gauges read 0, and a worker that has exited."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
