"""Per-worker plain counts land in the Prometheus series exactly as direct observations would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.tally import Tally

BUCKETS = (0.001, 0.01, 0.1, 1.0)


def _metrics(reg: CollectorRegistry) -> tuple[Counter, Counter, Histogram, Histogram, Gauge]:
    return (Counter("req", "r", ["backend", "scope", "code"], registry=reg),
            Counter("ref", "r", ["reason"], registry=reg),
            Histogram("add", "a", ["backend"], registry=reg, buckets=BUCKETS),
            Histogram("up", "u", ["backend"], registry=reg, buckets=BUCKETS), Gauge("fl", "f", registry=reg))


def _samples(reg: CollectorRegistry) -> list[str]:
    return sorted(line for line in generate_latest(reg).decode().splitlines()
                  if line and not line.startswith("#") and "_created" not in line)


def test_flushed_counts_equal_direct_observations() -> None:
    direct, tallied = CollectorRegistry(), CollectorRegistry()
    d_req, d_ref, d_add, d_up, d_fl = _metrics(direct)
    t = Tally(*_metrics(tallied))
    values = [0.0, 0.0005, 0.001, 0.0011, 0.01, 0.5, 1.0, 7.0, 0.001]
    for i, v in enumerate(values):
        code = 200 if i % 3 else 403
        d_req.labels("metrics", "metrics:read", str(code)).inc()
        t.request("metrics", "metrics:read", code)
        d_add.labels("metrics").observe(v)
        t.added("metrics", v)
        d_up.labels("logs").observe(v * 2)
        t.upstream("logs", v * 2)
        if code == 403:
            d_ref.labels("forbidden").inc()
            t.refusal("forbidden")
    t.in_flight = 3
    d_fl.set(3)
    assert _samples(direct) != _samples(tallied)  # nothing moved before the flush
    t.flush()
    assert _samples(direct) == _samples(tallied)
    t.flush()  # idempotent: nothing pending
    assert _samples(direct) == _samples(tallied)
