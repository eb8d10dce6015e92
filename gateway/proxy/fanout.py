"""Run a fan-out plan: the restricted requests concurrently, then one merged answer.

``gateway.lbac.fanout`` decides and builds the legs; this module sends them (same parameters but
the selector, so the same ``limit``, ``direction``, ``start`` and ``end``), and merges the answers
into what a tenant holding only the visible streams or series would get::

    resp, outcome = await execute(request, session, base, upstream_path, headers, plan, body_limit)

Each leg's answer is read whole once, every byte charged first to the worker's fan-out budget
(``gateway.proxy.budget``: 503 with ``Retry-After`` past ``limits.fanout_memory``, shared by every
concurrent fan-out), at most :data:`LEG_CONCURRENCY` legs of a request in flight. Answers larger than
``budget.INLINE_MERGE`` together are merged in a separate process, so the event loop never parses
megabytes; the legs' bytes are dropped as soon as they are parsed. Any leg that does not answer 200 is
passed on as the answer (its status and body), so Loki's and Prometheus's own errors reach the
client and a partial merge is never returned.

Merges, each chosen to equal the visible-only answer:

* Loki streams: the legs are disjoint (no stream is read twice, ``gateway.lbac.fanout._pieces``), so
  no entry is dropped as a duplicate (Loki answers the labels after the pipeline, which two streams
  may share, and deduplicates only within a stream); entries ordered as
  Loki's querier orders them (timestamp, then the stream's label string, reversed for
  ``backward``; ``pkg/iter`` heap iterators), cut to ``limit``, grouped by stream, streams sorted
  by label string (``logqlmodel.Streams.Less``). ``stats`` are summed, except wall-clock times
  and per-second rates (``execTime``, ``queueTime``, ``*PerSecond``), which take the largest leg's
  value since the legs run side by side.
* Loki labels and values: the union, sorted. ``detected_labels``: computed from one ``series`` answer for
  all the selectors (``gateway.proxy.detected``), so values seen under two selectors count once.
  ``detected_fields``: the union by name; Loki estimates their ``cardinality`` from a sample of lines
  per leg, and the merge reports the largest leg's estimate. ``detected_field`` values: the union.
* ``index/stats``, ``index/volume``, ``index/volume_range``: one leg per inclusion-exclusion term,
  summed with the terms' signs (``gateway.lbac.counts``); a volume leg that came back as full as it
  asked may have been cut, and the request is refused with a 400 rather than answered wrong.
* Prometheus range vectors: series by label set, samples by timestamp, sorted by labels.
* LogQL metric queries the union rewrite refuses: ``gateway.proxy.metric_merge`` (signed sums, maxima and
  minima, absence).
* Metadata: the tenant's metadata restricted to the metric names the token can see, then ``limit``.
* Remote read: see ``gateway.lbac.remote_read.merge_samples`` / ``merge_streamed``.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.lbac import RewriteError, tracereads
from gateway.lbac.counts import Counts, Inexact, merge_index_stats, merge_volumes
from gateway.lbac.fanout import Leg, Merge, Plan
from gateway.lbac.remote_read import SAMPLES_CONTENT_TYPE, STREAMED_CONTENT_TYPE, merge_samples, merge_streamed
from gateway.lbac.restrict import FORM
from gateway.merging import Unmergeable, merge_stats, success
from gateway.proxy.budget import (
    BUDGET,
    DEFAULT_FANOUT_MEMORY,
    INLINE_MERGE,
    Held,
    merge_cost,
    merge_off_loop,
    read_spooled,
    spool,
    unlink,
)
from gateway.proxy.detected import merge_detected_from_series
from gateway.proxy.errors import ProxyError
from gateway.proxy.forward import Outcome, _failure, _unfiltered, describe, forward, relay_websockets
from gateway.proxy.metric_merge import merge_absent, merge_extreme, merge_signed

#: Largest answer read from one leg (the worker's fan-out budget usually refuses sooner: 503).
MAX_ANSWER: Final = 256 * 1024 * 1024
#: Legs of one request in flight at once: a request's burst on the upstream is at most this many reads.
LEG_CONCURRENCY: Final = 4
_JSON: Final = "application/json; charset=utf-8"


@dataclass(slots=True)
class _Answer:
    status: int
    content_type: str
    body: bytes


def _url(base: str, path: str, query: str) -> str:
    return f"{base}{path}" + (f"?{query}" if query else "")


def _leg_headers(headers: CIMultiDict[str], leg: Leg) -> CIMultiDict[str]:
    h = headers.copy()
    h.popall("Accept-Encoding", None)  # the merge reads the answer: plain bytes, please
    h.popall("Content-Type", None)
    h.popall("Content-Length", None)
    if leg.body:
        h["Content-Type"] = leg.content_type
        if leg.content_type == FORM:
            h.popall("Content-Encoding", None)  # the gateway built this body: plain form text
    return h


async def _fetch(session: aiohttp.ClientSession, url: str, headers: CIMultiDict[str], leg: Leg,
                 held: Held) -> _Answer:
    """One leg's answer, read whole and decompressed, every byte charged to the worker's budget first."""
    try:
        method = "GET" if leg.method == "HEAD" else leg.method  # the merge needs the bodies
        async with session.request(method, url, headers=_leg_headers(headers, leg), data=leg.body,
                                   allow_redirects=False, compress=None) as up:
            if up.content_length is not None and up.content_length > MAX_ANSWER:
                raise _too_large()
            ctype = up.headers.get("Content-Type", "")
            is_json = "json" in ctype.lower()
            encoding = up.headers.get("Content-Encoding", "").strip().lower()
            if encoding not in _WBITS and encoding not in ("", "identity", "snappy"):
                raise ProxyError(502, f"upstream answered in an encoding the merge cannot read: {encoding}",
                                 "upstream_unavailable")
            plain = encoding not in _WBITS
            buf = bytearray()
            try:
                async for chunk in up.content.iter_chunked(_PIECE):
                    # 503 past the budget, before the bytes are kept: the bytes and what merging them will take
                    held.take(len(chunk) + (merge_cost(chunk, is_json) if plain else 0))
                    buf += chunk
                    if len(buf) > MAX_ANSWER:
                        raise _too_large()
                data = bytes(buf)
            finally:
                buf.clear()  # a refusal's traceback keeps this frame (and its buffer) alive until a collection
            if plain:
                return _Answer(up.status, ctype, data)
            cap = min(MAX_ANSWER, held.room())
            # zlib releases the GIL: inflating in a thread keeps megabytes of it off this event loop
            body, more, complete = await asyncio.get_running_loop().run_in_executor(
                None, _inflate, data, _WBITS[encoding], cap)
            if len(body) > MAX_ANSWER:
                raise _too_large()
            held.take(len(body) + more)  # past the room: 503
            if not complete:
                raise ProxyError(502, "upstream answer broke: truncated compressed body", "upstream_unavailable")
            for i in range(0, len(body), _PIECE):  # charged piece by piece: the loop is never held long
                held.take(merge_cost(body[i:i + _PIECE], is_json))
                await asyncio.sleep(0)
            return _Answer(up.status, ctype, body)
    except ProxyError:
        raise
    except (TimeoutError, aiohttp.ClientError, OSError, zlib.error, EOFError) as exc:
        if isinstance(exc, zlib.error | EOFError):
            raise ProxyError(502, f"upstream answer broke: {describe(exc)}", "upstream_unavailable") from None
        raise _failure(exc) from None


_WBITS: Final = {"gzip": 31, "deflate": 15}
_PIECE: Final = 256 * 1024


def _too_large() -> ProxyError:
    return ProxyError(502, f"upstream answer larger than {MAX_ANSWER} bytes cannot be merged", "upstream_too_large")


def _inflate(data: bytes, wbits: int, cap: int) -> tuple[bytes, int, bool]:
    """At most ``cap`` + 1 bytes of ``data`` inflated (a small bomb cannot grow the worker past its budget):
    (the bytes, 1 if more were left, whether the stream ended)."""
    d = zlib.decompressobj(wbits)
    out = d.decompress(data, cap + 1)
    return out, 1 if d.unconsumed_tail else 0, d.eof


async def execute(request: web.Request, session: aiohttp.ClientSession, base: str, path: str,
                  headers: CIMultiDict[str], plan: Plan, body_limit: int,
                  budget: int = DEFAULT_FANOUT_MEMORY) -> tuple[web.StreamResponse, Outcome]:
    """Send the plan's legs and answer the merged result (or the first leg that did not answer 200).

    ``budget`` is the worker's fan-out memory (``limits.fanout_memory``), shared by every fan-out.
    """
    if plan.merge is Merge.TAIL:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            raise ProxyError(400, "tail under several label policies needs a WebSocket upgrade", "bad_query")
        urls = [_url(base, leg.path or path, leg.query) for leg in plan.legs]
        # The legs are disjoint (no other socket sends a leg's entries): frames pass as sent.
        return await relay_websockets(request, session, urls, headers, _unfiltered)
    if plan.merge is Merge.SINGLE:
        leg = plan.legs[0]
        return await forward(request, session, _url(base, leg.path or path, leg.query), _leg_headers(headers, leg)
                             if leg.body else headers, leg.body, body_limit)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with BUDGET.hold(budget) as held:
        answers = await _fetch_all(session, base, path, headers, plan, held)
        upstream_seconds = loop.time() - started
        for a in answers:
            if a.status != 200:
                resp = web.Response(status=a.status, body=a.body, headers={"Content-Type": a.content_type or _JSON})
                return resp, Outcome(a.status, len(a.body), upstream_seconds)
        size = sum(len(a.body) for a in answers)
        try:
            if size <= INLINE_MERGE:
                body, ctype, extra = _merge(plan, answers)
            else:  # parsing megabytes holds the GIL: another process does it (its memory was charged by _fetch)
                paths = await spool([a.body for a in answers])
                metas = [(a.status, a.content_type) for a in answers]
                answers.clear()  # the bytes wait in the files now
                try:
                    body, ctype, extra = await merge_off_loop(_merge_spooled, plan, metas, paths)
                finally:
                    unlink(paths)
        except Inexact as exc:
            raise ProxyError(400, f"query refused by label-based access control: {exc}", "lbac_refused") from None
        except (Unmergeable, RewriteError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise ProxyError(502, f"the upstream's answers could not be merged: {exc}", "upstream_unmergeable"
                             ) from None
    resp = web.Response(status=200, body=body, headers={"Content-Type": ctype, **extra})
    return resp, Outcome(200, len(body), upstream_seconds)


async def _fetch_all(session: aiohttp.ClientSession, base: str, path: str, headers: CIMultiDict[str], plan: Plan,
                     held: Held) -> list[_Answer]:
    """Every leg's answer, at most LEG_CONCURRENCY in flight; the first failure stops the others."""
    gate = asyncio.Semaphore(LEG_CONCURRENCY)

    async def one(leg: Leg) -> _Answer:
        async with gate:
            return await _fetch(session, _url(base, leg.path or path, leg.query), headers, leg, held)

    tasks = [asyncio.ensure_future(one(leg)) for leg in plan.legs]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tasks.clear()  # the legs that finished hold their answers; the exception's traceback holds this frame
        raise


def _merge_spooled(plan: Plan, metas: list[tuple[int, str]], paths: list[str]) -> tuple[bytes, str, dict[str, str]]:
    """In the merge process: :func:`_merge` of the answers the worker spooled to files."""
    return _merge(plan, [_Answer(status, ctype, read_spooled(path)) for (status, ctype), path in zip(metas, paths,
                                                                                                  strict=True)])


def _merge(plan: Plan, answers: list[_Answer]) -> tuple[bytes, str, dict[str, str]]:
    if plan.merge is Merge.REMOTE_READ:
        types = {a.content_type.split(";", 1)[0].strip().lower() for a in answers}
        if types == {SAMPLES_CONTENT_TYPE}:
            return merge_samples([a.body for a in answers]), SAMPLES_CONTENT_TYPE, {"Content-Encoding": "snappy"}
        if types == {STREAMED_CONTENT_TYPE.split(";", 1)[0]}:
            return merge_streamed([a.body for a in answers]), STREAMED_CONTENT_TYPE, {}
        raise Unmergeable(f"remote read answers of types {sorted(types)}")
    docs = []
    for a in answers:  # each leg's bytes are dropped once parsed: one copy per leg at a time
        docs.append(json.loads(a.body))
        a.body = b""
    if plan.merge is Merge.METADATA:
        out = merge_metadata(docs[0], docs[1], plan.limit)
    else:
        out = _JSON_MERGES[plan.merge](docs, plan)
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode(), _JSON, {}


# --------------------------------------------------------------------------- JSON merges


def label_string(labels: dict[str, str]) -> str:
    """Loki's ``labels.String()``: ``{a="1", b="2"}``, names sorted (what Loki orders streams by)."""
    return "{" + ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(labels.items())) + "}"


def merge_streams(docs: list[Any], limit: int, forward: bool) -> dict[str, Any]:
    """Loki streams answers merged (see the module docstring)."""
    items: list[tuple[int, str, list[Any], dict[str, str]]] = []
    data0: dict[str, Any] = {}
    for doc in docs:
        data = success(doc)["data"]
        if data.get("resultType") != "streams":
            raise Unmergeable(f"resultType {data.get('resultType')!r}, expected streams")
        data0 = data0 or data
        for s in data["result"]:
            labels = s["stream"]
            key = label_string(labels)
            for e in s["values"]:
                items.append((int(e[0]), key, e, labels))
    items.sort(key=lambda t: (t[0], t[1]), reverse=not forward)
    if limit >= 0:
        del items[limit:]
    streams: dict[str, tuple[dict[str, str], list[Any]]] = {}
    for _, key, e, labels in items:
        streams.setdefault(key, (labels, []))[1].append(e)
    result = [{"stream": streams[k][0], "values": streams[k][1]} for k in sorted(streams)]
    data_out = {k: v for k, v in data0.items() if k not in ("result", "stats")}
    data_out["result"] = result
    if any("stats" in d["data"] for d in docs):
        data_out["stats"] = merge_stats([d["data"].get("stats", {}) for d in docs])
    return {"status": "success", "data": data_out}


def _values_union(docs: list[Any], _plan: Plan) -> dict[str, Any]:
    # Loki's v1 answer is {"data": [...]} (omitted when empty); the legacy /api/prom one {"values": [...]}
    key = "values" if any("values" in d for d in docs) and not any("data" in d for d in docs) else "data"
    out: set[str] = set()
    for doc in docs:
        vals = success(doc).get(key) or []
        if not isinstance(vals, list):
            raise Unmergeable(f"{key} is not a list")
        out.update(vals)
    return {**docs[0], "status": "success", key: sorted(out)}


def _by_name(docs: list[Any], list_key: str, name_key: str) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for doc in docs:
        for item in doc.get(list_key) or []:
            name = item[name_key]
            have = merged.get(name)
            if have is None:
                merged[name] = dict(item)
                continue
            have["cardinality"] = max(int(have.get("cardinality", 0)), int(item.get("cardinality", 0)))
            if "parsers" in item or "parsers" in have:
                have["parsers"] = sorted(set(have.get("parsers") or []) | set(item.get("parsers") or [])) or None
    return [merged[k] for k in sorted(merged)]


def _detected_labels(docs: list[Any], _plan: Plan) -> dict[str, Any]:
    return {**docs[0], "detectedLabels": _by_name(docs, "detectedLabels", "label")}


def _detected_fields(docs: list[Any], _plan: Plan) -> dict[str, Any]:
    out = {**docs[0], "fields": _by_name(docs, "fields", "label")}
    limit = docs[0].get("limit")
    if isinstance(limit, int) and limit > 0:
        out["fields"] = out["fields"][:limit]
    return out


def _detected_values(docs: list[Any], _plan: Plan) -> dict[str, Any]:
    values: set[str] = set()
    for doc in docs:
        values.update(doc.get("values") or [])
    out = {**docs[0], "values": sorted(values)}
    limit = docs[0].get("limit")
    if isinstance(limit, int) and limit > 0:
        out["values"] = out["values"][:limit]
    return out


def _counts(plan: Plan, n: int) -> Counts:
    if plan.counts is None or len(plan.counts.signs) != n:
        raise Unmergeable("a signed merge without one sign per leg")
    return plan.counts


def _index_stats(docs: list[Any], plan: Plan) -> dict[str, Any]:
    return merge_index_stats(docs, _counts(plan, len(docs)).signs)


def _volumes(docs: list[Any], plan: Plan) -> dict[str, Any]:
    out, stats = merge_volumes(docs, _counts(plan, len(docs)))
    if stats:
        out["data"]["stats"] = merge_stats(stats)
    return out


def merge_matrix(docs: list[Any], _plan: Plan | None = None) -> dict[str, Any]:
    series: dict[tuple[tuple[str, str], ...], tuple[dict[str, str], dict[float, Any]]] = {}
    warnings: list[str] = []
    for doc in docs:
        data = success(doc)["data"]
        if data.get("resultType") != "matrix":
            raise Unmergeable(f"resultType {data.get('resultType')!r}, expected matrix")
        for w in doc.get("warnings") or []:
            if w not in warnings:
                warnings.append(w)
        for s in data["result"]:
            key = tuple(sorted(s["metric"].items()))
            samples = series.setdefault(key, (s["metric"], {}))[1]
            for point in s.get("values") or []:
                samples.setdefault(float(point[0]), point)
            if s.get("histograms"):
                raise Unmergeable("native histograms")
    result = [{"metric": series[k][0], "values": [series[k][1][t] for t in sorted(series[k][1])]}
              for k in sorted(series)]
    out: dict[str, Any] = {"status": "success", "data": {"resultType": "matrix", "result": result}}
    if warnings:
        out["warnings"] = warnings
    return out


def merge_metadata(names_doc: Any, meta_doc: Any, limit: int) -> dict[str, Any]:
    """The tenant's metadata, restricted to the visible metric names, then cut to ``limit`` metrics."""
    names = success(names_doc)["data"]
    meta = success(meta_doc)["data"]
    if not isinstance(names, list) or not isinstance(meta, dict):
        raise Unmergeable("label values are not a list, or metadata is not an object")
    names = set(names)
    keep = [k for k in sorted(meta) if k in names]
    if limit >= 0:
        keep = keep[:limit]
    out = {k: v for k, v in meta_doc.items() if k != "data"}
    out["data"] = {k: meta[k] for k in keep}
    return out


_JSON_MERGES: Final[dict[Merge, Callable[[list[Any], Plan], dict[str, Any]]]] = {
    Merge.STREAMS: lambda docs, plan: merge_streams(docs, plan.limit, plan.forward),
    Merge.VALUES: _values_union,
    Merge.DETECTED_LABELS: _detected_labels,
    Merge.DETECTED_FIELDS: _detected_fields,
    Merge.DETECTED_VALUES: _detected_values,
    Merge.INDEX_STATS: _index_stats,
    Merge.VOLUME: _volumes,
    Merge.MATRIX: merge_matrix,
    Merge.SIGNED: merge_signed,
    Merge.ABSENT: merge_absent,
    Merge.MAX: merge_extreme,
    Merge.MIN: merge_extreme,
    Merge.TEMPO_TAGS: tracereads.merge_tags,
    Merge.TEMPO_TAG_VALUES: tracereads.merge_tag_values,
    Merge.DETECTED_FROM_SERIES: merge_detected_from_series,
}

