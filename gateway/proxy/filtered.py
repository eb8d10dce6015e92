"""Rule, alert and silence answers for label-restricted tokens: read whole, filtered, answered.

The ruler and the Alertmanager do not apply label policies, so for a restricted token the gateway sends
the request, reads the whole answer (bounded by :data:`MAX_ANSWER`, decompressed within the same bound),
keeps what :mod:`gateway.lbac.visibility` says is visible, and answers that. What it cannot read or check
is refused (403 with the reason, or 502 for an answer it cannot parse), never passed through::

    resp, outcome = await serve(request, session, base, m, headers, policies, body_limit)

Alertmanager (API v2, Mimir's ``/alertmanager`` prefix): alert and alert-group lists, silence lists and
single silences are filtered; a silence write is forwarded only when its matchers are covered by the
policies (and, for an update or an expiry, the existing silence too); posted alerts only when every alert's
labels are visible. Every other Alertmanager path (status, receivers, configuration, the UI) is refused.

Tempo's trace by ID (v1 and v2, JSON or protobuf as the client asks): spans outside the trace selectors
keep only their intrinsic fields (:mod:`gateway.lbac.traces`); a trace with no visible span is answered as
Tempo answers a trace it does not have (404, empty body). Only the time-range parameters pass: ``q`` and
span pruning would judge or summarise hidden spans, so they are refused, and a v2 request says
``span_pruning=false`` (Tempo may prune by default).
"""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

import aiohttp
import yaml
from aiohttp import web
from multidict import CIMultiDict

from gateway.lbac import pool, trace_search, traces
from gateway.lbac import visibility as vis
from gateway.policy.trace_selector import TraceSelector
from gateway.proxy.errors import ProxyError
from gateway.proxy.forward import Outcome, _failure, describe, forward
from gateway.routes import Kind, RouteMatch

Policies = vis.Policies
#: Route kinds whose answers this module filters (the handler sends restricted requests of these here).
KINDS: Final = frozenset({Kind.RULE_STATE, Kind.ALERT_STATE, Kind.RULE_CONFIG, Kind.ALERTMANAGER,
                          Kind.TRACE_BY_ID})
#: Largest upstream answer read for filtering (after decompression).
MAX_ANSWER: Final = 64 * 1024 * 1024
#: Larger answers are filtered in the LBAC pool's process, not on the event loop.
INLINE_ANSWER: Final = 64 * 1024
#: Largest silence or alert list a restricted token may post.
MAX_WRITE_BODY: Final = 1024 * 1024
_JSON: Final = "application/json"
_LANGUAGE: Final = {"metrics": "promql", "logs": "logql"}
_SILENCE_ID: Final = re.compile(r"[A-Za-z0-9-]{1,64}")
_PROTOBUF: Final = "application/protobuf"
#: Trace-by-ID parameters a restricted token may send (Tempo's pkg/api: the time range and the query mode).
_TRACE_PARAMS: Final = frozenset({"start", "end", "mode", "blockStart", "blockEnd"})
_MAX_TRACE_PARAMS: Final = 100


class _Answer:
    __slots__ = ("status", "content_type", "body")

    def __init__(self, status: int, content_type: str, body: bytes):
        self.status, self.content_type, self.body = status, content_type, body


def _unfilterable(what: str) -> ProxyError:
    return ProxyError(403, f"{what} cannot be filtered by label policies, and your token has some",
                      "lbac_unfilterable")


async def _fetch(session: aiohttp.ClientSession, method: str, url: str, headers: CIMultiDict[str],
                 body: bytes | None = None) -> tuple[_Answer, float]:
    """One upstream exchange read whole, at most MAX_ANSWER bytes once decoded."""
    h = headers.copy()
    h["Accept-Encoding"] = "gzip"
    if body is None:  # (a look-up on behalf of a write: not the write's body)
        for name in ("Content-Length", "Transfer-Encoding", "Content-Encoding", "Content-Type"):
            h.popall(name, None)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with session.request(method, url, headers=h, data=body, allow_redirects=False,
                                   compress=None) as up:
            encoding = up.headers.get("Content-Encoding", "").strip().lower()
            if encoding not in ("", "identity", "gzip"):
                raise ProxyError(502, f"upstream answered in an encoding the filter cannot read: {encoding}",
                                 "upstream_unavailable")
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
            buf = bytearray()
            async for chunk in up.content.iter_chunked(256 * 1024):
                buf += inflate.decompress(chunk, MAX_ANSWER + 1 - len(buf)) if inflate else chunk
                if len(buf) > MAX_ANSWER or (inflate is not None and inflate.unconsumed_tail):
                    raise ProxyError(502, f"upstream answer larger than {MAX_ANSWER} bytes cannot be filtered",
                                     "upstream_too_large")
            if inflate is not None and not inflate.eof:
                raise ProxyError(502, "upstream answer broke: truncated gzip", "upstream_unavailable")
            return _Answer(up.status, up.headers.get("Content-Type", ""), bytes(buf)), loop.time() - started
    except ProxyError:
        raise
    except zlib.error as exc:
        raise ProxyError(502, f"upstream answer broke: {describe(exc)}", "upstream_unavailable") from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise _failure(exc) from None


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_WRITE_BODY:
        raise ProxyError(413, f"request body exceeds {MAX_WRITE_BODY} bytes", "body_too_large")
    buf = bytearray()
    while chunk := await request.content.read(MAX_WRITE_BODY + 1 - len(buf)):
        buf += chunk
        if len(buf) > MAX_WRITE_BODY:
            raise ProxyError(413, f"request body exceeds {MAX_WRITE_BODY} bytes", "body_too_large")
    return bytes(buf)


@dataclass(frozen=True, slots=True)
class Filter:
    """What to keep of an answer (picklable, so a large answer is filtered in the LBAC pool's process)."""

    what: str  # "rules", "alerts", "config", "trace", "trace_v2", or an Alertmanager path of _AM_READS
    language: str
    policies: Policies
    judged: frozenset[tuple[str, str]] | None = None  # rule groups judged on a whole answer
    single: bool = False  # the configuration API's one-group form
    namespace: bool = False  # the configuration API's one-namespace form
    protobuf: bool = False  # a trace answer in protobuf


@dataclass(frozen=True, slots=True)
class Filtered:
    body: bytes
    content_type: str
    status: int = 200


def apply(f: Filter, raw: bytes) -> Filtered:
    """The filtered answer (pure; raises ValueError and the like for an answer it cannot read)."""
    if f.what == "config":
        out = vis.filter_rule_config(yaml.safe_load(raw), f.language, f.policies, f.single)
        if out is None or (not out and f.namespace):
            what = "group" if f.single else "namespace"
            raise ProxyError(404, f"{what} does not exist, or is not visible under your label policies",
                             "lbac_hidden")
        return Filtered(yaml.safe_dump(out, sort_keys=False, allow_unicode=True).encode(), "application/yaml")
    if f.what in ("trace", "trace_v2"):
        selectors = tuple(p for p in f.policies if isinstance(p, TraceSelector))
        body = traces.filter_answer(raw, selectors, f.what == "trace_v2", f.protobuf)
        if body is None:  # as Tempo answers a trace it does not have, or one its redactor hides
            return Filtered(b"", "", 404)
        return Filtered(body, _PROTOBUF if f.protobuf else _JSON)
    doc = json.loads(raw)
    if f.what in _AM_READS:
        return _json(_AM_READS[f.what](doc, f.policies))
    if f.what == "trace_search":
        return _json(trace_search.filter_answer(doc, f.policies))
    if not isinstance(doc, dict) or doc.get("status") != "success":
        raise ValueError("not a success answer")
    if f.what == "rules":
        judged = None if f.judged is None else set(f.judged)
        return _json(vis.filter_rule_groups(doc, f.language, f.policies, judged))
    return _json(vis.filter_alert_list(doc, f.policies))


async def _respond(answer: _Answer, seconds: float, f: Filter | None) -> tuple[web.StreamResponse, Outcome]:
    """The filtered answer; an upstream error (not 200) is passed on as it came. A large answer is filtered
    off the event loop (parsing thousands of rule queries takes a second), within the pool's time limit."""
    status = answer.status
    if status == 200 and f is not None:
        try:
            if f.protobuf and not answer.content_type.startswith(_PROTOBUF):
                raise ValueError("asked for protobuf, answered otherwise")
            out = apply(f, answer.body) if len(answer.body) <= INLINE_ANSWER else \
                await pool._off_loop(apply, f, answer.body)
        except ProxyError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError, RecursionError) as exc:
            raise ProxyError(502, f"the upstream's answer could not be filtered: {exc.__class__.__name__}",
                             "upstream_unfilterable") from None
        body, ctype, status = out.body, out.content_type, out.status
    else:
        body, ctype = answer.body, answer.content_type or _JSON
    return web.Response(status=status, body=body, headers={"Content-Type": ctype} if ctype else None), \
        Outcome(status, len(body), seconds)


def _json(out: Any) -> Filtered:
    return Filtered(json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode(), _JSON)


async def serve(request: web.Request, session: aiohttp.ClientSession, base: str, m: RouteMatch,
                headers: CIMultiDict[str], policies: Policies, body_limit: int, rewritten: str | None = None
                ) -> tuple[web.StreamResponse, Outcome]:
    """Serve a label-restricted request of a route in :data:`KINDS`, or a rewritten Tempo search (its query
    ``rewritten``; see the module docstring and gateway.lbac.trace_search)."""
    kind, path = m.route.kind, m.upstream_path
    query = request.rel_url.raw_query_string if rewritten is None else rewritten
    url = f"{base}{path}" + (f"?{query}" if query else "")
    if kind is Kind.TRACEQL:
        answer, seconds = await _fetch(session, "GET", url, headers)
        return await _respond(answer, seconds, Filter("trace_search", "", policies))
    if kind is Kind.ALERTMANAGER:
        return await _alertmanager(request, session, base, url, path, headers, policies, body_limit)
    if kind is Kind.TRACE_BY_ID:
        return await _trace_by_id(request, session, url, path, query, headers, policies)
    language = _LANGUAGE.get(m.route.backend)
    if language is None:  # pragma: no cover - the route tables give these kinds to metrics and logs only
        raise _unfilterable("this endpoint")
    if kind is Kind.RULE_STATE:
        judged = await _judge_groups(session, base, path, query, headers, language, policies)
        f = Filter("rules", language, policies, None if judged is None else frozenset(judged))
    elif kind is Kind.ALERT_STATE:
        f = Filter("alerts", language, policies)
    else:
        f = Filter("config", language, policies, single="groupName" in m.path_params,
                   namespace="namespace" in m.path_params)
    answer, seconds = await _fetch(session, "GET", url, headers)
    return await _respond(answer, seconds, f)


async def _trace_by_id(request: web.Request, session: aiohttp.ClientSession, url: str, path: str, query: str,
                       headers: CIMultiDict[str], policies: Policies) -> tuple[web.StreamResponse, Outcome]:
    """Tempo's trace by ID, filtered (see the module docstring)."""
    if not policies or not all(isinstance(p, TraceSelector) for p in policies):  # pragma: no cover - for_signal
        raise _unfilterable("a trace")
    try:
        names = {k for k, _ in parse_qsl(query, keep_blank_values=True, max_num_fields=_MAX_TRACE_PARAMS)}
    except ValueError:  # (more fields than that: parse_qsl refuses to count on)
        raise ProxyError(400, f"a trace by ID takes at most {_MAX_TRACE_PARAMS} parameters", "bad_data") from None
    if names - _TRACE_PARAMS:
        raise ProxyError(403, f"trace-by-ID parameters {', '.join(sorted(names - _TRACE_PARAMS))[:200]} cannot be "
                         "used under trace selectors (they would judge hidden spans); only "
                         f"{', '.join(sorted(_TRACE_PARAMS))} can", "lbac_refused")
    protobuf = _PROTOBUF in request.headers.get("Accept", "")
    h = headers.copy()
    h["Accept"] = _PROTOBUF if protobuf else _JSON  # only what the filter reads (not Tempo's LLM format)
    v2 = "/v2/traces/" in path
    if v2:  # Tempo may prune by default (span_pruning_enabled_by_default): its summary spans merge spans of
        # several resources into one, hidden ones with visible ones; an explicit false always wins
        url += ("&" if query else "?") + "span_pruning=false"
    answer, seconds = await _fetch(session, "GET", url, h)
    f = Filter("trace_v2" if v2 else "trace", "", policies, protobuf=protobuf)
    return await _respond(answer, seconds, f)


async def _judge_groups(session: aiohttp.ClientSession, base: str, path: str, query: str,
                        headers: CIMultiDict[str], language: str, policies: Policies) -> set[tuple[str, str]] | None:
    """With parameters that drop rules from groups, the visible groups judged on every rule of each group
    (the same request without them); None when the answer itself shows whole groups."""
    pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=1000)
    if not any(k in vis.NARROWING_PARAMS for k, _ in pairs):
        return None
    whole = urlencode([(k, v) for k, v in pairs if k not in vis.NARROWING_PARAMS])
    answer, _ = await _fetch(session, "GET", f"{base}{path}" + (f"?{whole}" if whole else ""), headers)
    if answer.status != 200:
        raise ProxyError(502, f"the ruler answered {answer.status} to the request judging rule groups",
                         "upstream_unfilterable")
    try:
        doc = json.loads(answer.body)
        return vis.visible_group_keys(doc, language, policies)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ProxyError(502, f"the upstream's answer could not be filtered: {exc.__class__.__name__}",
                         "upstream_unfilterable") from None


_AM_READS: Final[dict[str, Callable[[Any, Policies], Any]]] = {
    "/api/v2/alerts": vis.filter_alerts,
    "/api/v2/alerts/groups": vis.filter_alert_groups,
    "/api/v2/silences": vis.filter_silences,
}


async def _alertmanager(request: web.Request, session: aiohttp.ClientSession, base: str, url: str, path: str,
                        headers: CIMultiDict[str], policies: Policies, body_limit: int
                        ) -> tuple[web.StreamResponse, Outcome]:
    rest = path.removeprefix("/alertmanager") if path.startswith("/alertmanager/") else ""
    method = request.method
    if method in ("GET", "HEAD") and rest == "/api/v1/status/buildinfo":  # Grafana's probe: no tenant data
        return await forward(request, session, url, headers, None, body_limit)
    if method in ("GET", "HEAD") and rest in _AM_READS:
        answer, seconds = await _fetch(session, "GET", url, headers)
        return await _respond(answer, seconds, Filter(rest, "", policies))
    if rest.startswith("/api/v2/silence/") and method in ("GET", "HEAD", "DELETE"):
        sid = rest.removeprefix("/api/v2/silence/")
        answer, seconds = await _fetch(session, "GET", f"{base}/alertmanager/api/v2/silence/{_checked_id(sid)}",
                                       headers)
        if answer.status == 200:
            _check_silence(answer.body, policies, "this silence")
        if method == "DELETE" and answer.status == 200:
            return await forward(request, session, url, headers, None, body_limit)
        return await _respond(answer, seconds, None)
    if method == "POST" and rest == "/api/v2/silences":
        body = await _read_body(request)
        try:
            silence = json.loads(body)
        except ValueError:
            raise ProxyError(400, "the silence is not valid JSON", "bad_data") from None
        if not isinstance(silence, dict) or not vis.silence_visible(silence, policies):
            raise ProxyError(403, "the silence's matchers could match alerts outside your label policies: add "
                             "matchers that imply one of them", "lbac_refused")
        if silence.get("id"):  # an update expires the silence it names: that one must be visible too
            answer, _ = await _fetch(session, "GET", f"{base}/alertmanager/api/v2/silence/{_checked_id(silence['id'])}",
                                     headers)
            if answer.status == 200:
                _check_silence(answer.body, policies, "the silence this update replaces")
        return await _send(request, session, url, headers, body, body_limit)
    if method == "POST" and rest == "/api/v2/alerts":
        body = await _read_body(request)
        try:
            alerts = json.loads(body)
        except ValueError:
            raise ProxyError(400, "the alerts are not valid JSON", "bad_data") from None
        if not isinstance(alerts, list) or not vis.all_visible(
                (a.get("labels") if isinstance(a, dict) else None for a in alerts), policies):
            raise ProxyError(403, "an alert's labels are outside your label policies", "lbac_refused")
        return await _send(request, session, url, headers, body, body_limit)
    raise _unfilterable(f"Alertmanager's {method} {path[:200]}")


def _checked_id(sid: Any) -> str:
    if not isinstance(sid, str) or not _SILENCE_ID.fullmatch(sid):
        raise ProxyError(400, "a silence ID is a UUID", "bad_data")
    return sid


def _check_silence(raw: bytes, policies: Policies, what: str) -> None:
    try:
        silence = json.loads(raw)
    except ValueError:
        raise ProxyError(502, "the upstream's silence could not be read", "upstream_unfilterable") from None
    if not vis.silence_visible(silence, policies):
        raise ProxyError(403, f"{what} could match alerts outside your label policies", "lbac_refused")


async def _send(request: web.Request, session: aiohttp.ClientSession, url: str, headers: CIMultiDict[str],
                body: bytes, body_limit: int) -> tuple[web.StreamResponse, Outcome]:
    h = headers.copy()
    for name in ("Content-Length", "Transfer-Encoding", "Content-Encoding"):
        h.popall(name, None)
    h["Content-Type"] = _JSON
    return await forward(request, session, url, h, body, body_limit)
