"""The planner of filtered answers: what ``gateway.proxy.filtered`` does for a label-restricted request of
rules, alerts, silences or a trace by ID (or a rewritten TraceQL search), decided from the request alone.

Takes the route kind and backend, the upstream URL, the path, method, query, headers and path parameters,
the policies and (for a write) the body; gives a :class:`Task` (the operation, the URL, what to keep of
the answer, the silence to check, the checked body) or raises the refusal. Pure: the transport then only
fetches, checks what depends on the upstream's answer (the existing silence, the rule groups judged on a
whole answer) and filters the answer::

    task = plan_task(kind, backend, base, path, method, query, headers, path_params, policies, body)

Alertmanager (API v2, Mimir's ``/alertmanager`` prefix): alert and alert-group lists, silence lists and
single silences are read and filtered; a silence write only when its matchers are covered by the policies;
posted alerts only when every alert's labels are visible. Every other Alertmanager path (status, receivers,
configuration, the UI) is refused. Trace by ID: only the time-range parameters pass (``q`` and span pruning
would judge or summarise hidden spans), and a v2 request says ``span_pruning=false``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

from multidict import CIMultiDict

from gateway.errors import ProxyError
from gateway.lbac import visibility as vis
from gateway.policy.trace_selector import TraceSelector
from gateway.routes import Kind

Policies = vis.Policies
#: Route kinds whose answers are filtered (the plan sends restricted requests of these to the filter).
KINDS: Final = frozenset({Kind.RULE_STATE, Kind.ALERT_STATE, Kind.RULE_CONFIG, Kind.ALERTMANAGER,
                          Kind.TRACE_BY_ID})
#: Largest silence or alert list a restricted token may post.
MAX_WRITE_BODY: Final = 1024 * 1024
JSON: Final = "application/json"
PROTOBUF: Final = "application/protobuf"
#: Alertmanager lists read and filtered (``gateway.proxy.filtered`` holds each one's filter).
AM_READS: Final = frozenset({"/api/v2/alerts", "/api/v2/alerts/groups", "/api/v2/silences"})
_AM_BUILDINFO: Final = "/api/v1/status/buildinfo"  # Grafana's probe: no tenant data
_AM_SILENCE: Final = "/api/v2/silence/"
_LANGUAGE: Final = {"metrics": "promql", "logs": "logql"}
_SILENCE_ID: Final = re.compile(r"[A-Za-z0-9-]{1,64}")
#: Trace-by-ID parameters a restricted token may send (Tempo's pkg/api: the time range and the query mode).
TRACE_PARAMS: Final = frozenset({"start", "end", "mode", "blockStart", "blockEnd"})
MAX_TRACE_PARAMS: Final = 100


@dataclass(frozen=True, slots=True)
class Keep:
    """What to keep of an answer (picklable, so a large answer is filtered in the LBAC pool's process)."""

    what: str  # "rules", "alerts", "config", "trace", "trace_v2", "trace_search", or a path of AM_READS
    language: str
    policies: Policies
    judged: frozenset[tuple[str, str]] | None = None  # rule groups judged on a whole answer
    single: bool = False  # the configuration API's one-group form
    namespace: bool = False  # the configuration API's one-namespace form
    protobuf: bool = False  # a trace answer in protobuf


@dataclass(frozen=True, slots=True)
class Task:
    """The filtered transport's work: ``op`` is one of

    * ``read`` — GET ``url``, keep what ``keep`` says (``judge``: first GET that URL, the same request without
      the parameters that drop rules from groups, and judge the groups on its whole answer),
    * ``pass`` — forward the request as sent (no tenant data),
    * ``silence`` — GET the silence at ``silence``, check it, answer it (or its error) as it came,
    * ``delete`` — the same check, then forward the DELETE when the silence exists,
    * ``write`` — send ``body`` (checked here) to ``url``, after checking the silence at ``silence`` it
      replaces (an update), if any."""

    op: str
    url: str
    keep: Keep | None = None
    judge: str | None = None
    silence: str | None = None
    body: bytes | None = None


def unfilterable(what: str) -> ProxyError:
    return ProxyError(403, f"{what} cannot be filtered by label policies, and your token has some",
                      "lbac_unfilterable")


def body_limit(kind: Kind, path: str, method: str) -> int | None:
    """The body a task must see before it is planned (an Alertmanager write), else None."""
    if kind is Kind.ALERTMANAGER and method == "POST" and _am_rest(path) in _AM_WRITES:
        return MAX_WRITE_BODY
    return None


@dataclass(frozen=True, slots=True)
class _Req:
    kind: Kind
    backend: str
    base: str
    path: str
    method: str
    query: str
    headers: CIMultiDict[str]  # the upstream request's (a planner may set Accept or Content-Type)
    accept: str  # the client's Accept
    path_params: Mapping[str, str]
    policies: Policies
    body: bytes | None

    @property
    def url(self) -> str:
        return f"{self.base}{self.path}" + (f"?{self.query}" if self.query else "")


def plan_task(kind: Kind, backend: str, base: str, path: str, method: str, query: str, headers: CIMultiDict[str],
              accept: str, path_params: Mapping[str, str], policies: Policies, body: bytes | None) -> Task:
    """The task of a restricted request of a route in :data:`KINDS`, or of a rewritten TraceQL search (its
    ``query`` rewritten); ``headers`` are the upstream request's, set here where a task needs it."""
    r = _Req(kind, backend, base, path, method, query, headers, accept, path_params, policies, body)
    planner = _BY_KIND.get(kind)
    return planner(r) if planner is not None else _rules(r)


def _whole_groups(url: str) -> str | None:
    """The rule-state request that shows every rule of each group (``url`` without the parameters that drop
    rules: ``vis.NARROWING_PARAMS``), or None when ``url`` has none of them (its answer shows whole groups)."""
    head, _, query = url.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=1000)
    if not any(k in vis.NARROWING_PARAMS for k, _ in pairs):
        return None
    whole = urlencode([(k, v) for k, v in pairs if k not in vis.NARROWING_PARAMS])
    return head + (f"?{whole}" if whole else "")


def _search(r: _Req) -> Task:
    return Task("read", r.url, Keep("trace_search", "", r.policies))


def _rules(r: _Req) -> Task:
    language = _LANGUAGE.get(r.backend)
    if language is None:  # pragma: no cover - the route tables give these kinds to metrics and logs only
        raise unfilterable("this endpoint")
    if r.kind is Kind.RULE_STATE:
        return Task("read", r.url, Keep("rules", language, r.policies), judge=_whole_groups(r.url))
    if r.kind is Kind.ALERT_STATE:
        return Task("read", r.url, Keep("alerts", language, r.policies))
    return Task("read", r.url, Keep("config", language, r.policies, single="groupName" in r.path_params,
                                    namespace="namespace" in r.path_params))


def _trace_by_id(r: _Req) -> Task:
    """Tempo's trace by ID: filtered (see the module docstring)."""
    policies = r.policies
    if not policies or not all(isinstance(p, TraceSelector) for p in policies):  # pragma: no cover - for_signal
        raise unfilterable("a trace")
    try:
        names = {k for k, _ in parse_qsl(r.query, keep_blank_values=True, max_num_fields=MAX_TRACE_PARAMS)}
    except ValueError:  # (more fields than that: parse_qsl refuses to count on)
        raise ProxyError(400, f"a trace by ID takes at most {MAX_TRACE_PARAMS} parameters", "bad_data") from None
    if names - TRACE_PARAMS:
        raise ProxyError(403, f"trace-by-ID parameters {', '.join(sorted(names - TRACE_PARAMS))[:200]} cannot be "
                         "used under trace selectors (they would judge hidden spans); only "
                         f"{', '.join(sorted(TRACE_PARAMS))} can", "lbac_refused")
    protobuf = PROTOBUF in r.accept
    r.headers["Accept"] = PROTOBUF if protobuf else JSON  # only what the filter reads (not Tempo's LLM format)
    url = r.url
    v2 = "/v2/traces/" in r.path
    if v2:  # Tempo may prune by default (span_pruning_enabled_by_default): its summary spans merge spans of
        # several resources into one, hidden ones with visible ones; an explicit false always wins
        url += ("&" if r.query else "?") + "span_pruning=false"
    return Task("read", url, Keep("trace_v2" if v2 else "trace", "", policies, protobuf=protobuf))


def _am_rest(path: str) -> str:
    return path.removeprefix("/alertmanager") if path.startswith("/alertmanager/") else ""


def _alertmanager(r: _Req) -> Task:
    """An Alertmanager request: by method and path (``_AM_READS_BY`` and ``_AM_WRITES``), else refused."""
    rest, method = _am_rest(r.path), r.method
    if method in ("GET", "HEAD"):
        if rest == _AM_BUILDINFO:
            return Task("pass", r.url)
        if rest in AM_READS:
            return Task("read", r.url, Keep(rest, "", r.policies))
    if rest.startswith(_AM_SILENCE) and method in ("GET", "HEAD", "DELETE"):
        silence = _silence_url(r.base, rest.removeprefix(_AM_SILENCE))
        return Task("delete" if method == "DELETE" else "silence", r.url, silence=silence)
    write = _AM_WRITES.get(rest) if method == "POST" else None
    if write is None:
        raise unfilterable(f"Alertmanager's {method} {r.path[:200]}")
    body = r.body or b""  # (read before planning: body_limit)
    replaces = write(r, body)
    for name in ("Content-Length", "Transfer-Encoding", "Content-Encoding"):
        r.headers.popall(name, None)
    r.headers["Content-Type"] = JSON
    return Task("write", r.url, silence=replaces, body=body)


def _silence_write(r: _Req, body: bytes) -> str | None:
    """A silence may be written when its matchers are covered; an update names the silence it replaces."""
    try:
        silence = json.loads(body)
    except ValueError:
        raise ProxyError(400, "the silence is not valid JSON", "bad_data") from None
    if not isinstance(silence, dict) or not vis.silence_visible(silence, r.policies):
        raise ProxyError(403, "the silence's matchers could match alerts outside your label policies: add "
                         "matchers that imply one of them", "lbac_refused")
    # an update expires the silence it names: that one must be visible too (checked by the transport)
    return _silence_url(r.base, silence["id"]) if silence.get("id") else None


def _alerts_write(r: _Req, body: bytes) -> str | None:
    """Alerts may be posted when every alert's labels are visible."""
    try:
        alerts = json.loads(body)
    except ValueError:
        raise ProxyError(400, "the alerts are not valid JSON", "bad_data") from None
    if not isinstance(alerts, list) or not vis.all_visible(
            (a.get("labels") if isinstance(a, dict) else None for a in alerts), r.policies):
        raise ProxyError(403, "an alert's labels are outside your label policies", "lbac_refused")
    return None


def _silence_url(base: str, sid: Any) -> str:
    if not isinstance(sid, str) or not _SILENCE_ID.fullmatch(sid):
        raise ProxyError(400, "a silence ID is a UUID", "bad_data")
    return f"{base}/alertmanager/api/v2/silence/{sid}"


#: Alertmanager writes (POST) by path: the body's check, giving the silence an update replaces.
_AM_WRITES: Final[dict[str, Callable[[_Req, bytes], str | None]]] = {
    "/api/v2/silences": _silence_write,
    "/api/v2/alerts": _alerts_write,
}
#: The planner by route kind (the rule kinds: ``_rules``).
_BY_KIND: Final[dict[Kind, Callable[[_Req], Task]]] = {
    Kind.TRACEQL: _search, Kind.ALERTMANAGER: _alertmanager, Kind.TRACE_BY_ID: _trace_by_id,
}
