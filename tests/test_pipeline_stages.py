"""The decide and plan stages as pure functions (issue 24): every route of the tables x every kind of token
(none, unrestricted, label-restricted, narrowed by Grafana team rules, narrowed by the client's
X-Prom-Label-Policy) x every LBAC mode (header as the probe verified it, enforce, auto without a verdict, and
header without one) goes through ``decide`` and ``plan`` on an in-memory snapshot, with no server and no
database, and the plan is checked against what the mode and the token allow:

* no token: 401 with the challenge, from *decide*;
* whatever passes: the stack's tenant in X-Scope-OrgID, no credential, no client-chosen label policy upstream;
* unrestricted (and the client's header on a route that reads nothing): the request as sent;
* narrowed reads of rules, alerts and silences: the answer filtered by the policies, in every mode;
* other narrowed reads: in header mode the query as sent with the label-policy header, in enforce mode every
  query sent upstream restricted to the policy and no header; remote read needs its body in enforce mode;
  tenant-wide endpoints are fanned out or refused; header mode without a verdict is refused (503);
* rule writes by a narrowed token: refused (rule results would bypass the label policies).
"""

from __future__ import annotations

import asyncio
import base64
import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.cache import PolicyCache
from gateway.config import Config
from gateway.errors import ProxyError
from gateway.lbac import restrict as lbac
from gateway.lbac.fanout import Merge
from gateway.lbac.probe import Verdict, probe_of
from gateway.lbac.remote_read import MAX_READ_BODY
from gateway.policy import tokens as tokfmt
from gateway.policy.datasource import fold_login
from gateway.policy.decision import INGEST_SCOPES
from gateway.policy.model import AccessPolicy, Realm, Token
from gateway.policy.scopes import ALL_SCOPES
from gateway.policy.selector import parse_selector
from gateway.proxy.decide import decide
from gateway.proxy.filtered import KINDS as FILTERED_KINDS
from gateway.proxy.filterplan import MAX_WRITE_BODY
from gateway.proxy.plan import FanOut, Filter, Forward, NeedsBody, Plan, Refuse, Stream, plan, upstream_of
from gateway.routes import ALL_ROUTES, Kind, Route, match
from gateway.state import State
from gateway.store import Snapshot
from tests.conftest import TEST_CONFIG, make_config

TENANT = "100"
SELECTOR = parse_selector('{env="dev"}')
ALICE = "alice"
TOKENS = ("none", "unrestricted", "restricted", "team_rules", "client_header")
MODES = ("header", "enforce", "auto", "header_unverified")
#: The query each kind carries in the table's requests.
QUERIES: dict[Kind, str] = {
    Kind.PROMQL: "query=up", Kind.MATCH: "match%5B%5D=up", Kind.LOGQL: "query=%7Bapp%3D%22a%22%7D",
    Kind.LOGQL_OPTIONAL: "query=%7Bapp%3D%22a%22%7D", Kind.LOGQL_SERIES: "match%5B%5D=%7Bapp%3D%22a%22%7D",
    Kind.LOGQL_TAIL: "query=%7Bapp%3D%22a%22%7D", Kind.LOGQL_DELETE: "query=%7Bapp%3D%22a%22%7D",
}


@dataclass
class _URL:
    raw_path: str
    raw_query_string: str


@dataclass
class _Request:
    """A bodiless request's facts, as the plan reads them."""

    method: str
    headers: CIMultiDictProxy[str]
    rel_url: _URL
    remote: str | None = "10.0.0.1"
    body_exists: bool = False
    content_length: int | None = None
    upstream_path: str = ""  # (not read by the plan: what the route sends upstream, for the checks)


def _config(mode: str) -> Config:
    lbac_mode = "header" if mode.startswith("header") else mode
    stacks = [{**s, "tenants": {**s["tenants"], "profiles": s["tenants"]["metrics"]}}
              for s in TEST_CONFIG["orgs"][0]["stacks"]]
    orgs = [{**TEST_CONFIG["orgs"][0], "stacks": stacks}, *TEST_CONFIG["orgs"][1:]]
    upstreams = {signal: {"url": f"http://{signal}.test:80", "lbac": lbac_mode}
                 for signal in ("metrics", "logs")}
    upstreams |= {"traces": {"url": "http://traces.test:80"}, "profiles": {"url": "http://profiles.test:80"}}
    return make_config("postgresql://unused/x", orgs=orgs, upstreams=upstreams)


@dataclass
class World:
    """One config (one mode) and one snapshot: two tokens of org 1 on stack 100, all scopes."""

    st: State
    cfg: Config
    free: str  # a token without label policies
    narrowed: str  # a token whose realm carries SELECTOR


def _world(mode: str) -> World:
    cfg = _config(mode)
    cache = PolicyCache(store=None)  # type: ignore[arg-type]  # no I/O: every token is in the snapshot
    policies: dict[str, tuple[AccessPolicy, int]] = {}
    tokens: dict[str, tuple[Token, int]] = {}
    secrets: list[str] = []
    for label_policies in ((), (SELECTOR,)):
        p = AccessPolicy(id=str(uuid.uuid4()), org_id="1", name=f"p{len(policies)}", display_name="p",
                         scopes=frozenset(ALL_SCOPES), realms=(Realm("stack", "100", label_policies),))
        secret = tokfmt.new_secret()
        t = Token(id=str(uuid.uuid4()), access_policy_id=p.id, name=f"t{len(tokens)}", display_name="t",
                  secret_hash=tokfmt.hash_secret(secret))
        policies[p.id], tokens[t.id] = (p, 1), (t, 1)
        secrets.append(tokfmt.encode("1", t.id, secret, "local"))
    cache._merge(Snapshot(policies, tokens, {}, {}), cache._epoch)
    cache.loaded = cache.db_ok = True
    free_policy = next(iter(policies))
    cache.team_rules = {(free_policy, backend): {fold_login(ALICE): {TENANT: (SELECTOR,)}}
                        for backend in ("metrics", "logs", "traces", "profiles")}
    st = State(cfg, None, cache)  # type: ignore[arg-type]
    if mode == "header":  # the probe found that the backends enforce the header
        for signal in ("metrics", "logs"):
            probe_of(st.extras).verdicts[signal] = Verdict(cfg.upstreams[signal].url_for("read"), True, "ok", 0.0)
    return World(st, cfg, secrets[0], secrets[1])


_WORLDS: dict[str, World] = {}


def _example(pattern: str) -> str:
    return re.sub(r"\{(\w+)(?::[^{}]+)?\}", "x1", pattern)


def _request(route: Route, token: str, w: World) -> _Request:
    method = "GET" if "GET" in route.methods else sorted(route.methods)[0]
    headers: CIMultiDict[str] = CIMultiDict()
    if token != "none":
        secret = w.narrowed if token == "restricted" else w.free
        headers["Authorization"] = "Basic " + base64.b64encode(f"{TENANT}:{secret}".encode()).decode()
    if token == "team_rules":
        headers[w.cfg.grafana_user_header] = ALICE
    if token == "client_header":
        headers.add("X-Prom-Label-Policy", lbac.headers_for(TENANT, (SELECTOR,))[0])
    if route.websocket:
        headers.update({"Upgrade": "websocket", "Connection": "Upgrade"})
    return _Request(method, CIMultiDictProxy(headers), _URL(_example(route.pattern), QUERIES.get(route.kind, "")))


async def _decide_and_plan(route: Route, token: str, mode: str) -> tuple[_Request, Plan]:
    w = _WORLDS.get(mode) or _WORLDS.setdefault(mode, _world(mode))
    req = _request(route, token, w)
    m = match(req.method, req.rel_url.raw_path)
    assert m is not None and m.route is route
    req.upstream_path = m.upstream_path
    upstream = upstream_of(w.cfg, route)
    try:
        decision, policies = await decide(w.st, w.cfg, route, req.headers, None, {})
    except ProxyError as exc:
        return req, Refuse(exc.status, exc.reason, exc.message, exc.headers)
    return req, plan(w.st, w.cfg, m, upstream, decision, policies, req)


def _narrowed(token: str, route: Route) -> bool:
    """Whether the effective label policies are SELECTOR (else none): the client's header counts on reads only."""
    if token in ("restricted", "team_rules"):
        return True
    return token == "client_header" and route.kind in lbac.RESTRICTED_KINDS


def _restricted(text: str) -> bool:
    return 'env="dev"' in unquote_plus(text)


def w_base(route: Route) -> str:
    """The configured upstream URL of the route's backend (the table's config: ``_config``)."""
    return f"http://{route.backend}.test:80"


def _check_headers(headers: CIMultiDict[str], label_policy: bool) -> None:
    assert headers.getall("X-Scope-OrgID") == [TENANT]
    assert "Authorization" not in headers
    if label_policy:
        assert tuple(headers.getall("X-Prom-Label-Policy")) == lbac.headers_for(TENANT, (SELECTOR,))
    else:
        assert "X-Prom-Label-Policy" not in headers


def _expect(route: Route, token: str, mode: str, req: _Request, p: Plan) -> None:
    kind = route.kind
    if token == "none":
        assert isinstance(p, Refuse) and p.status == 401 and "WWW-Authenticate" in (p.headers or {})
        return
    narrowed = _narrowed(token, route)
    if route.scope == "rules:write" and narrowed:
        assert isinstance(p, Refuse) and (p.status, p.reason) == (403, "lbac_unfilterable")
        return
    if route.backend == "traces" and route.scope not in INGEST_SCOPES and (
            token == "restricted" or (narrowed and kind in lbac.RESTRICTED_KINDS)):
        # SELECTOR is a label selector: it cannot restrict traces, so they are not read whole (issue 27)
        assert isinstance(p, Refuse) and (p.status, p.reason) == (403, "lbac_unfilterable"), p
        return
    transport = Stream if route.websocket else Forward
    if not narrowed or kind not in lbac.RESTRICTED_KINDS:  # the request as sent
        assert isinstance(p, transport), p
        query = req.rel_url.raw_query_string
        base = w_base(route)
        assert p.url == f"{base}{req.upstream_path}" + (f"?{query}" if query else "")
        _check_headers(p.headers, False)
        assert isinstance(p, Stream) or p.body is None
        return
    if kind is Kind.ALERTMANAGER:  # (the table's paths are none the filter reads or checks: the plan refuses)
        assert isinstance(p, Refuse) and (p.status, p.reason, p.lbac) == (403, "lbac_unfilterable", "filtered"), p
        return
    if kind in FILTERED_KINDS:  # rules, alerts, silences: the answer is filtered, in every mode
        assert isinstance(p, Filter) and p.policies == (SELECTOR,) and p.lbac == "filtered", p
        _check_headers(p.headers, False)
        return
    unverified = isinstance(p, Refuse) and (p.status, p.reason) == (503, "lbac_unverified")
    if kind is Kind.TENANT_WIDE:
        if isinstance(p, FanOut):  # (Mimir's metadata: the visible metric names, then their metadata)
            assert p.legs.merge is Merge.METADATA
        else:  # (what can be fanned out is refused in header mode without a verdict, like any narrowed read)
            assert isinstance(p, Refuse)
            assert (p.status, p.reason) == (403, "lbac_unfilterable") or (unverified and mode == "header_unverified")
        return
    if mode == "header_unverified":
        assert unverified, p
        return
    header = mode == "header"
    if kind is Kind.REMOTE_READ and not header:
        assert p == NeedsBody(MAX_READ_BODY, "enforce")
        return
    assert not isinstance(p, Refuse | NeedsBody), p
    assert p.lbac == ("header" if header else "enforce")  # type: ignore[union-attr]
    if isinstance(p, FanOut):
        _check_headers(p.headers, header)
        assert all(_restricted(leg.query) or _restricted((leg.body or b"").decode()) for leg in p.legs.legs) \
            or header
        return
    assert isinstance(p, transport), p
    _check_headers(p.headers, header)
    query = p.url.split("?", 1)[1] if "?" in p.url else ""
    if header and kind is not Kind.LOGQL_DELETE:  # the backend filters: the query goes as sent
        assert query == req.rel_url.raw_query_string
    else:  # the gateway restricts every selector itself
        assert _restricted(query), (p.url, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("token", TOKENS)
def test_every_route_and_token_through_decide_and_plan(token: str, mode: str) -> None:
    async def run() -> list[tuple[Route, _Request, Plan]]:
        return [(r, *await _decide_and_plan(r, token, mode)) for r in ALL_ROUTES]

    kinds: dict[str, int] = {}
    for route, req, p in asyncio.run(run()):
        _expect(route, token, mode, req, p)
        kinds[type(p).__name__] = kinds.get(type(p).__name__, 0) + 1
    assert sum(kinds.values()) == len(ALL_ROUTES)
    if token == "none":
        assert set(kinds) == {"Refuse"}
    elif token in ("restricted", "team_rules") and mode == "enforce":
        assert {"Forward", "Stream", "FanOut", "NeedsBody", "Refuse"} <= set(kinds)


@pytest.mark.parametrize("mode", ["header", "enforce"])
def test_the_fast_paths_shared_headers_change_no_plan(mode: str) -> None:
    """Planned with the fast path's store of upstream headers (``shared``, one per memo entry: here per route
    and token), twice, every route's plan and headers are those planned without it; only a forward keeps its
    headers there (a filter's task sets its own), and a new query then gets the same headers object."""
    async def run() -> None:
        for token in ("unrestricted", "restricted", "team_rules", "client_header"):
            for route in ALL_ROUTES:
                req, alone = await _decide_and_plan(route, token, mode)
                if isinstance(alone, Refuse | NeedsBody):
                    continue
                w = _WORLDS[mode]
                m = match(req.method, req.rel_url.raw_path)
                assert m is not None
                decision, policies = await decide(w.st, w.cfg, route, req.headers, None, {})
                store: dict[Any, Any] = {}
                twice = [plan(w.st, w.cfg, m, upstream_of(w.cfg, route), decision, policies, req, shared=store)
                         for _ in range(2)]
                for p in twice:
                    assert p == alone
                    assert list(p.headers.items()) == list(alone.headers.items())  # type: ignore[union-attr]
                kept = isinstance(alone, Forward) and not route.websocket
                assert (twice[0].headers is twice[1].headers) == kept  # type: ignore[union-attr]
                assert bool(store) == kept

    asyncio.run(run())


def test_a_new_query_on_shared_headers_is_rewritten_as_its_own() -> None:
    """Two PromQL queries planned with one store: each URL carries its own rewritten query, the headers are
    the same object, equal to those planned without the store."""
    w = _WORLDS.get("enforce") or _WORLDS.setdefault("enforce", _world("enforce"))
    route = next(r for r in ALL_ROUTES if r.pattern == "/prometheus/api/v1/query")
    headers = _request(route, "restricted", w).headers
    m = match("GET", "/prometheus/api/v1/query")
    assert m is not None

    async def run() -> list[Plan]:
        decision, policies = await decide(w.st, w.cfg, route, headers, None, {})
        store: dict[Any, Any] = {}
        return [plan(w.st, w.cfg, m, upstream_of(w.cfg, route), decision, policies,
                     _Request("GET", headers, _URL(m.upstream_path, f"query={name}")), shared=store)
                for name in ("up", "down")] + [
            plan(w.st, w.cfg, m, upstream_of(w.cfg, route), decision, policies,
                 _Request("GET", headers, _URL(m.upstream_path, "query=down")))]

    up, down, alone = asyncio.run(run())
    assert isinstance(up, Forward) and isinstance(down, Forward) and isinstance(alone, Forward)
    assert "up%7B" in up.url and "down%7B" in down.url and _restricted(down.url.split("?", 1)[1])
    assert down == alone and up.headers is down.headers
    assert list(down.headers.items()) == list(alone.headers.items())


def test_a_narrowed_read_with_a_body_to_read_is_planned_again_with_it() -> None:
    """NeedsBody then a plan from the body: an enforce-mode form query is rewritten into a new form body."""
    w = _WORLDS.get("enforce") or _WORLDS.setdefault("enforce", _world("enforce"))
    route = next(r for r in ALL_ROUTES if r.pattern == "/prometheus/api/v1/query")
    headers = CIMultiDict(_request(route, "restricted", w).headers)
    headers["Content-Type"] = lbac.FORM
    req = _Request("POST", CIMultiDictProxy(headers), _URL("/prometheus/api/v1/query", ""), body_exists=True,
                   content_length=8)
    m = match("POST", "/prometheus/api/v1/query")
    assert m is not None

    async def run() -> tuple[Plan, Plan]:
        decision, policies = await decide(w.st, w.cfg, route, req.headers, None, {})
        first = plan(w.st, w.cfg, m, upstream_of(w.cfg, route), decision, policies, req)
        return first, plan(w.st, w.cfg, m, upstream_of(w.cfg, route), decision, policies, req, b"query=up")

    first, second = asyncio.run(run())
    assert first == NeedsBody(lbac.MAX_FORM_BODY, "enforce")
    assert isinstance(second, Forward) and second.body is not None and _restricted(second.body.decode())
    assert second.headers["Content-Type"] == lbac.FORM and "Content-Length" not in second.headers


def test_a_body_past_the_limit_and_another_form_type_are_refused_by_the_plan() -> None:
    w = _WORLDS.get("enforce") or _WORLDS.setdefault("enforce", _world("enforce"))
    route = next(r for r in ALL_ROUTES if r.pattern == "/prometheus/api/v1/query")
    m = match("POST", "/prometheus/api/v1/query")
    assert m is not None
    base: dict[str, Any] = dict(_request(route, "restricted", w).headers)

    async def run(headers: dict[str, Any], length: int) -> Plan:
        req = _Request("POST", CIMultiDictProxy(CIMultiDict(headers)), _URL(m.upstream_path, ""), body_exists=True,
                       content_length=length)
        decision, policies = await decide(w.st, w.cfg, route, req.headers, None, {})
        return plan(w.st, w.cfg, m, upstream_of(w.cfg, route), decision, policies, req)  # (before any read)

    multipart = asyncio.run(run({**base, "Content-Type": "multipart/form-data; boundary=x"}, 8))
    assert isinstance(multipart, Refuse) and (multipart.status, multipart.reason) == (415, "bad_form")
    free = dict(_request(route, "unrestricted", w).headers)
    big = asyncio.run(run(free, w.cfg.limits.max_request_body + 1))
    assert isinstance(big, Refuse) and (big.status, big.reason) == (413, "body_too_large")


def _plan_restricted(method: str, path: str, body: bytes | None = None, ctype: str = "") -> Plan:
    """A restricted token's request through decide and plan (enforce mode), with its body if given."""
    w = _WORLDS.get("enforce") or _WORLDS.setdefault("enforce", _world("enforce"))
    m = match(method, path)
    assert m is not None
    headers = CIMultiDict(_request(m.route, "restricted", w).headers)
    if ctype:
        headers["Content-Type"] = ctype
    req = _Request(method, CIMultiDictProxy(headers), _URL(path, ""), body_exists=body is not None,
                   content_length=None if body is None else len(body))

    async def run() -> Plan:
        decision, policies = await decide(w.st, w.cfg, m.route, req.headers, None, {})
        return plan(w.st, w.cfg, m, upstream_of(w.cfg, m.route), decision, policies, req, body)

    return asyncio.run(run())


def test_alertmanager_requests_are_planned_from_the_request_alone() -> None:
    """The filter's decisions that need no upstream answer are the plan's: what is read and kept, what passes,
    which silence is checked, a write's body checked (read first), and every other path refused."""
    am = "/alertmanager/api/v2"
    lists = _plan_restricted("GET", f"{am}/alerts/groups")
    assert isinstance(lists, Filter) and lists.task.op == "read" and lists.task.keep is not None
    assert lists.task.keep.what == "/api/v2/alerts/groups" and lists.task.url.endswith(f"{am}/alerts/groups")
    probe = _plan_restricted("GET", "/alertmanager/api/v1/status/buildinfo")
    assert isinstance(probe, Filter) and probe.task.op == "pass" and probe.task.keep is None
    delete = _plan_restricted("DELETE", f"{am}/silence/0d1e-2f")
    assert isinstance(delete, Filter) and delete.task.op == "delete"
    assert delete.task.silence == "http://metrics.test:80/alertmanager/api/v2/silence/0d1e-2f"
    bad_id = _plan_restricted("GET", f"{am}/silence/a_b")
    assert isinstance(bad_id, Refuse) and (bad_id.status, bad_id.reason, bad_id.lbac) == (400, "bad_data", "filtered")
    status = _plan_restricted("GET", f"{am}/status")
    assert isinstance(status, Refuse) and (status.status, status.reason) == (403, "lbac_unfilterable")

    assert _plan_restricted("POST", f"{am}/silences") == NeedsBody(MAX_WRITE_BODY, "filtered")
    covered = b'{"id":"ab-1","matchers":[{"name":"env","value":"dev","isRegex":false,"isEqual":true}]}'
    write = _plan_restricted("POST", f"{am}/silences", covered, "text/plain")
    assert isinstance(write, Filter) and write.task.op == "write" and write.task.body == covered
    assert write.task.silence == "http://metrics.test:80/alertmanager/api/v2/silence/ab-1"  # (an update's)
    assert write.headers["Content-Type"] == "application/json" and "Content-Length" not in write.headers
    wide = _plan_restricted("POST", f"{am}/silences", b'{"matchers":[{"name":"a","value":"b","isRegex":false}]}')
    assert isinstance(wide, Refuse) and (wide.status, wide.reason, wide.lbac) == (403, "lbac_refused", "filtered")
    alerts = _plan_restricted("POST", f"{am}/alerts", b"[{")
    assert isinstance(alerts, Refuse) and (alerts.status, alerts.reason) == (400, "bad_data")
