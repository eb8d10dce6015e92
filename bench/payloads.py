"""Request bodies and queries: a 1 MB snappy remote_write body, a Loki push, a realistic PromQL query."""

from __future__ import annotations

import json
import random
import struct
import time
from urllib.parse import quote

import cramjam

#: A realistic 211-character PromQL query (CPU usage against requests, per pod), restricted in enforce mode.
PROMQL = ('sum by (namespace, pod) (rate(container_cpu_usage_seconds_total{namespace="team-a",image!=""}[5m])) '
          '/ on (namespace, pod) group_left sum by (namespace, pod) (kube_pod_container_resource_requests'
          '{resource="cpu"})')
LOGQL = ('sum by (level) (count_over_time({namespace="team-a", app="checkout"} |= "error" '
         '| json | status >= 500 [5m]))')


def query_path(query: str) -> str:
    return "/prometheus/api/v1/query?query=" + quote(query, safe="")


def varying_query_path() -> tuple[str, str]:
    """(prefix, suffix) of the instant-query path; wrk puts a counter between them (``image!="v<n>"``),
    so every request is a query the rewrite cache has not seen."""
    marker = "COUNTER"
    prefix, suffix = query_path(PROMQL.replace('image!=""', f'image!="v{marker}"')).split(marker)
    return prefix, suffix


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _label(name: str, value: str) -> bytes:
    return _field(1, name.encode()) + _field(2, value.encode())


def remote_write_body(target: int = 1 << 20, seed: int = 7) -> tuple[bytes, int]:
    """A Prometheus remote_write WriteRequest (protobuf, snappy block format) of about ``target`` bytes
    compressed; returns (body, series). Random sample values keep it from compressing to nothing."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    now_ms = int(time.time() * 1000)
    series: list[bytes] = []
    compressed = b""
    n = 0
    while len(compressed) < target:
        for _ in range(500):
            labels = (_label("__name__", f"bench_metric_{n % 97}") + _label("instance", f"host-{n % 211}:9100")
                      + _label("job", "node") + _label("namespace", f"team-{n % 13}") + _label("series", str(n)))
            samples = b"".join(
                _field(2, b"\x09" + struct.pack("<d", rng.random() * 1e6) + b"\x10" + _varint(now_ms - i * 15000))
                for i in range(10))
            series.append(_field(1, labels + samples))
            n += 1
        compressed = bytes(cramjam.snappy.compress_raw(b"".join(series)))
    return compressed, n


def loki_push_body(streams: int = 4, lines: int = 25, seed: int = 11) -> bytes:
    """A Loki JSON push: a few streams of log lines (about 16 KB)."""
    rng = random.Random(seed)  # noqa: S311 - test data, not secrets
    now_ns = time.time_ns()
    out = []
    for s in range(streams):
        values = [[str(now_ns - i * 1_000_000), f"level=info ts={now_ns} caller=handler.go:{rng.randint(1, 999)} "
                   f"msg=\"request served\" path=/api/v1/items/{rng.randint(1, 99999)} status=200 "
                   f"duration={rng.random():.6f}s"] for i in range(lines)]
        out.append({"stream": {"namespace": "team-a", "app": f"checkout-{s}", "level": "info"}, "values": values})
    return json.dumps({"streams": out}).encode()
