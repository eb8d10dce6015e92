"""What a label-restricted token may see of rules, alerts and silences: the visibility rules, pure.

A rule-state or Alertmanager answer cannot be narrowed by rewriting the request (the ruler and the
Alertmanager ignore label policies), so the gateway reads the whole answer and keeps only what is
visible. The rules, each chosen so that nothing kept can reveal data outside the policies:

* **A selector is covered** by the policies when its own matchers imply every matcher of at least one
  policy selector: then every series or stream it can read is visible. Implication is checked
  conservatively: the same matcher, an equality whose value satisfies the policy matcher, or a regex
  that is a plain alternation of literals each of which satisfies it. Anything else counts as not covered.
* **A rule group is visible** when every vector selector (PromQL, for Mimir and Prometheus) or stream
  selector (LogQL, for Loki) of every rule's query is covered. Such a group is returned whole, its
  alerts included: they are computed from visible data only. A query that does not parse hides the group.
* **An alert is visible** (``/api/v1/alerts``, Alertmanager's alert lists) when its labels match a policy
  selector.
* **A silence is visible, and may be written**, when its matchers, read as one selector, are covered:
  then it can only ever silence visible alerts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Final

import promql_parser as pp

from gateway.lbac import RewriteError
from gateway.lbac.bounds import SizedLRU
from gateway.lbac.logql import _lex
from gateway.lbac.promql import _normalize, _parse, _triples
from gateway.policy.selector import LabelMatcher, MatchOpStr, Selector

Policies = tuple[Selector, ...]
_LITERAL: Final = re.compile(r"[A-Za-z0-9_\-:/ ,=@#%&'!~<>]*")
#: Longest query looked at; a longer one hides its group (the parsers' own limits are of this order).
MAX_RULE_QUERY: Final = 128 * 1024


def _literal_values(pattern: str) -> list[str] | None:
    """The values a fully anchored ``=~`` pattern matches when it is ``a|b|c`` of plain literals."""
    parts = pattern.split("|")
    return parts if all(_LITERAL.fullmatch(p) for p in parts) else None


def _implies_one(have: Sequence[LabelMatcher], need: LabelMatcher) -> bool:
    for h in have:
        if h.name != need.name:
            continue
        if h.op == need.op and h.value == need.value:
            return True
        if h.op == "=" and need.matches({h.name: h.value}):
            return True
        if h.op == "=~" and (values := _literal_values(h.value)) is not None \
                and all(need.matches({h.name: v}) for v in values):
            return True
    return False


def covered(matchers: Sequence[LabelMatcher], policies: Policies) -> bool:
    """Whether a selector made of ``matchers`` can only select what some policy selector allows."""
    return any(all(_implies_one(matchers, need) for need in p.matchers) for p in policies)


def labels_visible(labels: Any, policies: Policies) -> bool:
    """Whether a label set (an alert's) matches a policy selector; anything but a string map is not."""
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        return False
    return any(p.matches(labels) for p in policies)


def _promql_selectors(query: str) -> list[list[LabelMatcher]]:
    tree = _parse(_normalize(query), "the rule's query")
    out: list[list[LabelMatcher]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, pp.VectorSelector):
            ms = [LabelMatcher(n, op, v) for n, op, v in _triples(node)]  # type: ignore[arg-type]
            if node.name:
                ms.append(LabelMatcher("__name__", "=", node.name))
            out.append(ms)
        return True

    pp.walk(tree, visit)
    return out


def _logql_selectors(query: str) -> list[list[LabelMatcher]]:
    return [list(s.matchers) for s in _lex(query)[1]]


_SELECTORS: Final = {"promql": _promql_selectors, "logql": _logql_selectors}


#: Verdicts by (query, language, policies): the ruler answers the same rules at every poll.
_VERDICTS: Final[SizedLRU[tuple[str, str, Policies], bool]] = SizedLRU(16384)


def query_visible(query: Any, language: str, policies: Policies) -> bool:
    """Whether every selector of ``query`` is covered (see the module docstring); False when unsure."""
    if not isinstance(query, str) or len(query) > MAX_RULE_QUERY:
        return False
    key = (query, language, policies)
    hit = _VERDICTS.get(key)
    if hit is None:
        hit = _query_visible(query, language, policies)
        _VERDICTS.put(key, hit, len(query))
    return hit


def _query_visible(query: str, language: str, policies: Policies) -> bool:
    try:
        return all(covered(ms, policies) for ms in _SELECTORS[language](query))
    except RewriteError:
        return False
    except BaseException as exc:  # pyo3 panics are BaseException: fail closed
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return False


def _group_visible(group: Any, query_key: str, language: str, policies: Policies) -> bool:
    rules = group.get("rules") if isinstance(group, dict) else None
    if not isinstance(rules, list):
        return False
    return all(isinstance(r, dict) and query_visible(r.get(query_key), language, policies) for r in rules)


#: ``/api/v1/rules`` parameters that drop rules from a group (Prometheus, Mimir): with any of them the answer
#: does not show every rule of a group, so the groups are judged on a second answer without them.
NARROWING_PARAMS: Final = frozenset({"type", "rule_name[]", "match[]", "group_limit", "group_next_token"})


def _groups(doc: Any) -> list[Any]:
    groups = doc["data"]["groups"]
    if not isinstance(groups, list):
        raise ValueError("data.groups is not a list")
    return groups


def visible_group_keys(doc: Any, language: str, policies: Policies) -> set[tuple[str, str]]:
    """(file, name) of the visible groups of a Prometheus-format ``/api/v1/rules`` answer."""
    return {(str(g.get("file")), str(g.get("name"))) for g in _groups(doc)
            if _group_visible(g, "query", language, policies)}


def filter_rule_groups(doc: Any, language: str, policies: Policies,
                       judged: set[tuple[str, str]] | None = None) -> Any:
    """A Prometheus-format ``/api/v1/rules`` answer with only the visible groups (``query`` per rule), or
    only those of ``judged`` (see :data:`NARROWING_PARAMS`)."""
    keys = visible_group_keys(doc, language, policies) if judged is None else judged
    doc["data"]["groups"] = [g for g in _groups(doc) if (str(g.get("file")), str(g.get("name"))) in keys]
    return doc


def filter_alert_list(doc: Any, policies: Policies) -> Any:
    """A Prometheus-format ``/api/v1/alerts`` answer with only the visible alerts."""
    alerts = doc["data"]["alerts"]
    if not isinstance(alerts, list):
        raise ValueError("data.alerts is not a list")
    doc["data"]["alerts"] = [a for a in alerts if isinstance(a, dict) and labels_visible(a.get("labels"), policies)]
    return doc


def filter_rule_config(doc: Any, language: str, policies: Policies, single_group: bool) -> Any:
    """The ruler's configuration API (YAML): ``{namespace: [group, ...]}`` with only the visible groups
    (``expr`` per rule) and no empty namespace, or one group (``single_group``), None when hidden."""
    if single_group:
        return doc if _group_visible(doc, "expr", language, policies) else None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError("the rule configuration is not a map of namespaces")
    out: dict[Any, Any] = {}
    for ns, groups in doc.items():
        if not isinstance(groups, list):
            raise ValueError("a namespace's groups are not a list")
        kept = [g for g in groups if _group_visible(g, "expr", language, policies)]
        if kept:
            out[ns] = kept
    return out


# --------------------------------------------------------------------------- Alertmanager (API v2)


def silence_matchers(matchers: Any) -> list[LabelMatcher] | None:
    """Alertmanager's ``[{name, value, isRegex, isEqual}]`` as matchers, or None when malformed."""
    if not isinstance(matchers, list) or not matchers:
        return None
    out: list[LabelMatcher] = []
    for m in matchers:
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not isinstance(m.get("value"), str):
            return None
        regex, equal = m.get("isRegex", False), m.get("isEqual", True)
        if not isinstance(regex, bool) or not isinstance(equal, bool):
            return None
        op: MatchOpStr = ("=~" if equal else "!~") if regex else ("=" if equal else "!=")
        if regex:
            try:
                re.compile(m["value"])
            except re.error:
                return None
        out.append(LabelMatcher(m["name"], op, m["value"]))
    return out


def silence_visible(silence: Any, policies: Policies) -> bool:
    """Whether a silence can only silence visible alerts (its matchers are covered)."""
    ms = silence_matchers(silence.get("matchers")) if isinstance(silence, dict) else None
    return ms is not None and covered(ms, policies)


def filter_alerts(alerts: Any, policies: Policies) -> list[Any]:
    """Alertmanager's ``GET /api/v2/alerts``: the visible alerts."""
    return [a for a in _list(alerts) if isinstance(a, dict) and labels_visible(a.get("labels"), policies)]


def filter_alert_groups(groups: Any, policies: Policies) -> list[Any]:
    """``GET /api/v2/alerts/groups``: each group's visible alerts; a group left empty is dropped (its own
    labels are the grouping labels of alerts it no longer shows)."""
    out = []
    for g in _list(groups):
        if not isinstance(g, dict):
            raise ValueError("an alert group is not an object")
        kept = filter_alerts(g.get("alerts"), policies)
        if kept:
            out.append({**g, "alerts": kept})
    return out


def filter_silences(silences: Any, policies: Policies) -> list[Any]:
    """``GET /api/v2/silences``: the visible silences."""
    return [s for s in _list(silences) if silence_visible(s, policies)]


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value


def all_visible(labelsets: Iterable[Any], policies: Policies) -> bool:
    """Whether every label set (alerts a client posts) is visible."""
    return all(labels_visible(ls, policies) for ls in labelsets)
