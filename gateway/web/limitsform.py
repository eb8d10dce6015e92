"""The page's limit fields: a policy's ``lokiQueryPolicy`` (Cloud's) and ``gatewayLimits`` (ours) as text
inputs, and back into ``attributes`` (other attribute keys, such as ``pdcConfiguration``, are kept).

    texts = form_texts(policy.attributes_json)            # {"lokiQueryPolicy.maxQueryLength": "7d", ...}
    attrs, errors = merged(policy.attributes_json, texts)  # the API's validation; errors per field key
"""

from __future__ import annotations

import json
from typing import Any, Final

from gateway.admin import validate as v
from gateway.admin.errors import ApiError

#: (attribute key, field, label, kind: "int" | "num" | "text" | "list")
FIELDS: Final = (
    ("gatewayLimits", "requestsPerSecond", "Requests per second", "num"),
    ("gatewayLimits", "burst", "Burst (requests)", "int"),
    ("gatewayLimits", "writeBytesPerSecond", "Write bytes per second", "int"),
    ("gatewayLimits", "concurrentQueries", "Concurrent queries", "int"),
    ("lokiQueryPolicy", "maxEntriesLimitPerQuery", "Loki: max entries per query", "int"),
    ("lokiQueryPolicy", "maxQueryLookback", "Loki: max query lookback (e.g. 30d)", "text"),
    ("lokiQueryPolicy", "maxQueryLength", "Loki: max query length (e.g. 24h)", "text"),
    ("lokiQueryPolicy", "maxQueryInterval", "Loki: max query interval", "text"),
    ("lokiQueryPolicy", "queryTimeout", "Loki: query timeout (e.g. 30s)", "text"),
    ("lokiQueryPolicy", "maxQueryTime", "Loki: max query time", "text"),
    ("lokiQueryPolicy", "maxQueryBytesRead", "Loki: max bytes read per query (e.g. 50GB)", "text"),
    ("lokiQueryPolicy", "requiredLabels", "Loki: required labels (comma separated)", "list"),
    ("lokiQueryPolicy", "minimumLabelsNumber", "Loki: minimum number of label matchers", "int"),
)


def _load(attributes_json: str | None) -> dict[str, Any]:
    try:
        got = json.loads(attributes_json or "null")
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}


def form_texts(attributes_json: str | None) -> dict[str, str]:
    """Each field's text, keyed ``<attribute>.<field>``."""
    attrs = _load(attributes_json)
    out: dict[str, str] = {}
    for key, name, _, kind in FIELDS:
        val = (attrs.get(key) or {}).get(name) if isinstance(attrs.get(key), dict) else None
        if val is None:
            continue
        out[f"{key}.{name}"] = ", ".join(val) if kind == "list" and isinstance(val, list) else (
            f"{val:g}" if isinstance(val, float) else str(val))
    return out


def merged(attributes_json: str | None, texts: dict[str, str]) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """The policy's attributes with the fields as typed (empty: removed; absent from ``texts``: kept),
    checked like the API checks them; and a message per field that is not valid."""
    attrs = _load(attributes_json)
    errors: dict[str, str] = {}
    for key, name, _, kind in FIELDS:
        if f"{key}.{name}" not in texts:  # (not on the form that was posted: kept as it is)
            continue
        text = texts[f"{key}.{name}"].strip()
        sub = dict(attrs.get(key) or {}) if isinstance(attrs.get(key), dict) else {}
        sub.pop(name, None)
        if text:
            value: Any = text
            if kind in ("int", "num"):
                try:
                    value = int(text) if kind == "int" or text.isdigit() else float(text)
                except ValueError:
                    errors[f"{key}.{name}"] = "must be a number" if kind == "num" else "must be a whole number"
                    continue
            elif kind == "list":
                value = [s.strip() for s in text.split(",") if s.strip()]
            sub[name] = value
        if sub:
            attrs[key] = sub
        else:
            attrs.pop(key, None)
    if errors:
        return None, errors
    try:
        checked = v.attributes(attrs or None)
    except ApiError as exc:
        field = (exc.field or "").removeprefix("attributes.")
        return None, {field: exc.message}
    return checked, {}
