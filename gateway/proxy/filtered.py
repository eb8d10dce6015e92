"""Rule, alert and silence answers for label-restricted tokens: read whole, filtered, answered.

The ruler and the Alertmanager do not apply label policies, so for a restricted token the gateway sends
the request, reads the whole answer (bounded by :data:`MAX_ANSWER`, decompressed within the same bound),
keeps what :mod:`gateway.lbac.visibility` says is visible, and answers that. What it cannot read or check
is refused (502 for an answer it cannot parse, 403 for a silence outside the policies), never passed
through. A transport: the plan (``gateway.proxy.filterplan``) decided from the request what to send, what
to keep and what to refuse; here only what depends on the upstream's answer is checked::

    resp, outcome = await serve(request, session, task, headers, body_limit)

Alertmanager: a single silence (read, deleted, or replaced by an update) is fetched first and must be
visible. Rule state with parameters that drop rules from groups: the groups are judged on the whole answer.
Tempo's trace by ID (v1 and v2, JSON or protobuf as the client asks): spans outside the trace selectors
keep only their intrinsic fields (:mod:`gateway.lbac.traces`); a trace with no visible span is answered as
Tempo answers a trace it does not have (404, empty body).
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Final

import aiohttp
import yaml
from aiohttp import web
from multidict import CIMultiDict

from gateway.lbac import pool, trace_search, traces
from gateway.lbac import visibility as vis
from gateway.policy.trace_selector import TraceSelector
from gateway.proxy import filterplan
from gateway.proxy.errors import ProxyError
from gateway.proxy.filterplan import Keep, Task
from gateway.proxy.forward import Outcome, _failure, describe, forward

Policies = vis.Policies
KINDS: Final = filterplan.KINDS  # (the plan's: re-exported for the tests)
#: Largest upstream answer read for filtering (after decompression).
MAX_ANSWER: Final = 64 * 1024 * 1024
#: Larger answers are filtered in the LBAC pool's process, not on the event loop.
INLINE_ANSWER: Final = 64 * 1024
_JSON: Final = filterplan.JSON
_PROTOBUF: Final = filterplan.PROTOBUF


class _Answer:
    __slots__ = ("status", "content_type", "body")

    def __init__(self, status: int, content_type: str, body: bytes):
        self.status, self.content_type, self.body = status, content_type, body


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


@dataclass(frozen=True, slots=True)
class Filtered:
    body: bytes
    content_type: str
    status: int = 200


def apply(f: Keep, raw: bytes) -> Filtered:
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


async def _respond(answer: _Answer, seconds: float, f: Keep | None) -> tuple[web.StreamResponse, Outcome]:
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


async def serve(request: web.Request, session: aiohttp.ClientSession, task: Task, headers: CIMultiDict[str],
                policies: Policies, body_limit: int) -> tuple[web.StreamResponse, Outcome]:
    """Carry out the plan's task (see ``gateway.proxy.filterplan.Task``)."""
    return await _OPS[task.op](request, session, task, headers, policies, body_limit)


async def _read(request: web.Request, session: aiohttp.ClientSession, task: Task, headers: CIMultiDict[str],
                policies: Policies, body_limit: int) -> tuple[web.StreamResponse, Outcome]:
    keep = task.keep
    if keep is not None and task.judge is not None:
        judged = await _judge_groups(session, task.judge, headers, keep.language, policies)
        keep = replace(keep, judged=frozenset(judged))
    answer, seconds = await _fetch(session, "GET", task.url, headers)
    return await _respond(answer, seconds, keep)


async def _pass(request: web.Request, session: aiohttp.ClientSession, task: Task, headers: CIMultiDict[str],
                policies: Policies, body_limit: int) -> tuple[web.StreamResponse, Outcome]:
    return await forward(request, session, task.url, headers, None, body_limit)


async def _silence(request: web.Request, session: aiohttp.ClientSession, task: Task, headers: CIMultiDict[str],
                   policies: Policies, body_limit: int) -> tuple[web.StreamResponse, Outcome]:
    """A single silence: answered (or deleted) only when it is visible; its error as it came."""
    assert task.silence is not None  # (the plan's: filterplan._alertmanager)
    answer, seconds = await _fetch(session, "GET", task.silence, headers)
    if answer.status == 200:
        _check_silence(answer.body, policies, "this silence")
    if task.op == "delete" and answer.status == 200:
        return await forward(request, session, task.url, headers, None, body_limit)
    return await _respond(answer, seconds, None)


async def _write(request: web.Request, session: aiohttp.ClientSession, task: Task, headers: CIMultiDict[str],
                 policies: Policies, body_limit: int) -> tuple[web.StreamResponse, Outcome]:
    """A checked write; an update's silence must be visible too."""
    if task.silence is not None:
        answer, _ = await _fetch(session, "GET", task.silence, headers)
        if answer.status == 200:
            _check_silence(answer.body, policies, "the silence this update replaces")
    return await forward(request, session, task.url, headers, task.body, body_limit)


async def _judge_groups(session: aiohttp.ClientSession, url: str, headers: CIMultiDict[str], language: str,
                        policies: Policies) -> set[tuple[str, str]]:
    """The visible rule groups, judged on every rule of each group: ``url`` is the plan's request without the
    parameters that drop rules from groups (``Task.judge``)."""
    answer, _ = await _fetch(session, "GET", url, headers)
    if answer.status != 200:
        raise ProxyError(502, f"the ruler answered {answer.status} to the request judging rule groups",
                         "upstream_unfilterable")
    try:
        doc = json.loads(answer.body)
        return vis.visible_group_keys(doc, language, policies)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ProxyError(502, f"the upstream's answer could not be filtered: {exc.__class__.__name__}",
                         "upstream_unfilterable") from None


#: The filter of each Alertmanager list the plan reads (``filterplan.AM_READS``).
_AM_READS: Final[dict[str, Callable[[Any, Policies], Any]]] = {
    "/api/v2/alerts": vis.filter_alerts,
    "/api/v2/alerts/groups": vis.filter_alert_groups,
    "/api/v2/silences": vis.filter_silences,
}


def _check_silence(raw: bytes, policies: Policies, what: str) -> None:
    try:
        silence = json.loads(raw)
    except ValueError:
        raise ProxyError(502, "the upstream's silence could not be read", "upstream_unfilterable") from None
    if not vis.silence_visible(silence, policies):
        raise ProxyError(403, f"{what} could match alerts outside your label policies", "lbac_refused")


#: The transport of each task (``filterplan.Task.op``).
_OPS: Final[dict[str, Callable[[web.Request, aiohttp.ClientSession, Task, CIMultiDict[str], Policies, int],
                               Awaitable[tuple[web.StreamResponse, Outcome]]]]] = {
    "read": _read, "pass": _pass, "silence": _silence, "delete": _silence, "write": _write,
}
