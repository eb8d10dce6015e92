"""Validation of admin request bodies, shared by the API and the page: one message per field."""

from __future__ import annotations

import ipaddress
import uuid
from datetime import UTC, datetime
from typing import Any, Final

from gateway.admin import text
from gateway.admin.errors import ApiError, bad_request
from gateway.config import Config
from gateway.limits import lokiquery
from gateway.policy.model import Network, Realm
from gateway.policy.scopes import is_valid_scope
from gateway.policy.selector import SelectorError
from gateway.policy.trace_selector import parse_label_policy
from gateway.store import AdminScope

MAX_NAME: Final = 255
MAX_DISPLAY: Final = 255
MAX_LIST: Final = 100


def obj(body: Any, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    for key in body:
        if key not in allowed:
            raise bad_request(f"unknown field {key!r} (allowed: {', '.join(allowed)})", key)
    for key in required:
        if body.get(key) is None:
            raise bad_request(f"{key} is required", key)
    return body


def name(value: Any, field: str = "name") -> str:
    """A policy or token name: the spec gives no pattern and Cloud takes e.g. ``MyToken-1767225600`` (the
    provider's rotating tokens are ``<name_prefix>-<unix expiry>``): any printable text, no control
    characters or lone surrogates, nothing to trim at either end."""
    if (not isinstance(value, str) or not 1 <= len(value) <= MAX_NAME or not value.isprintable()
            or value != value.strip()):
        raise bad_request(f"{field} must be 1-{MAX_NAME} printable characters, without spaces at either end", field)
    return value


def display_name(value: Any, default: str, field: str = "displayName") -> str:
    """``None`` and ``""`` mean "not given" (Terraform sends ``"displayName": ""`` when unset)."""
    if value is None or value == "":
        return default
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_DISPLAY:
        raise bad_request(f"{field} must be a non-empty string of at most {MAX_DISPLAY} characters", field)
    return text.check(value, field)


def scopes(value: Any) -> frozenset[str]:
    """Any ``service:permission`` of Cloud's syntax; the gateway enforces those it serves, the rest grant nothing."""
    if not isinstance(value, list) or not value or len(value) > MAX_LIST:
        raise bad_request(f"scopes must be a non-empty list of at most {MAX_LIST} such as [\"metrics:read\"]",
                          "scopes")
    for i, s in enumerate(value):
        if not is_valid_scope(s):
            raise bad_request(f"scope {s!r} is not of the form service:permission (lowercase, e.g. metrics:read)",
                              f"scopes[{i}]")
    return frozenset(value)


def realms(value: Any, cfg: Config, admin: AdminScope) -> tuple[Realm, ...]:
    """Realms must name an org or stack of the config, inside the caller's reach."""
    if not isinstance(value, list) or not value:
        raise bad_request("realms must be a non-empty list of {type, identifier, labelPolicies}", "realms")
    if len(value) > MAX_LIST:
        raise bad_request(f"at most {MAX_LIST} realms", "realms")
    out: list[Realm] = []
    seen: set[tuple[str, str]] = set()
    for i, r in enumerate(value):
        f = f"realms[{i}]"
        if not isinstance(r, dict):
            raise bad_request("must be an object {type, identifier, labelPolicies}", f)
        for key in r:
            if key not in ("type", "identifier", "labelPolicies"):
                raise bad_request(f"unknown field {key!r}", f"{f}.{key}")
        rtype = r.get("type")
        if rtype not in ("org", "stack"):
            raise bad_request("type must be 'org' or 'stack'", f"{f}.type")
        ident = r.get("identifier")
        if isinstance(ident, int) and not isinstance(ident, bool):
            ident = str(ident)
        if not isinstance(ident, str) or not ident:
            raise bad_request("identifier must be the id of a stack, or the id or slug of an org", f"{f}.identifier")
        written = None
        if rtype == "org" and ident not in cfg.orgs_by_id:  # an org by its slug: enforced by its id
            named = sorted((o for o in cfg.orgs if o.name == ident), key=lambda o: o.id != admin.org_id)
            by_slug = named[0] if named else None  # the caller's own org first: org names need not be unique
            if by_slug is not None:
                written, ident = ident, by_slug.id
        org = cfg.realm_org(rtype, ident)
        if org is None:
            raise bad_request(f"no {rtype} with id {ident!r} is configured", f"{f}.identifier")
        if org != admin.org_id:
            raise ApiError(403, "permission_denied", f"{rtype} {ident} belongs to another org", f"{f}.identifier")
        if not admin.whole_org and not (rtype == "stack" and ident in admin.stacks):
            raise ApiError(403, "permission_denied",
                           f"your token's realm does not cover {rtype} {ident}", f"{f}.identifier")
        if (rtype, ident) in seen:
            raise bad_request(f"{rtype} {ident} is listed twice", f)
        seen.add((rtype, ident))
        out.append(Realm(rtype, ident, label_policies(r.get("labelPolicies"), f"{f}.labelPolicies"), written))
    return tuple(out)


def label_policies(value: Any, field: str) -> tuple[Any, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise bad_request(f"must be a list of at most {MAX_LIST} {{\"selector\": ...}} objects", field)
    out: dict[str, Any] = {}  # by the text as written: two spellings of one selector both read back
    for j, lp in enumerate(value):
        f = f"{field}[{j}]"
        if not isinstance(lp, dict) or set(lp) != {"selector"}:
            raise bad_request("must be an object with exactly one field, selector", f)
        if isinstance(lp["selector"], str):
            text.check(lp["selector"], f"{f}.selector")
        try:
            sel = parse_label_policy(lp["selector"])
        except SelectorError as exc:
            raise bad_request(f"selector {exc}", f"{f}.selector") from None
        out.setdefault(sel.text, sel)
    return tuple(out.values())


Subnets = tuple[tuple[Network, ...], tuple[str, ...]]


def conditions(value: Any) -> tuple[Network, ...]:
    """``null``, ``{}`` or ``{"allowedSubnets": []}`` all mean: no IP ranges."""
    return conditions_text(value)[0]


def conditions_text(value: Any) -> Subnets:
    """:func:`conditions` and the subnets' text as written, one for one."""
    if value is None:
        return (), ()
    if not isinstance(value, dict):
        raise bad_request("conditions must be an object {allowedSubnets: [...]}", "conditions")
    for key in value:
        if key != "allowedSubnets":
            raise bad_request(f"unknown field {key!r}", f"conditions.{key}")
    return subnets_text(value.get("allowedSubnets"), "conditions.allowedSubnets")


def subnets(value: Any, field: str) -> tuple[Network, ...]:
    return tuple(dict.fromkeys(subnets_text(value, field)[0]))


def subnets_text(value: Any, field: str) -> Subnets:
    """CIDRs as lenient as Go's ``net.ParseCIDR`` (host bits may be set: ``10.1.2.3/8`` is 10.0.0.0/8),
    and also bare addresses; returns the networks to enforce and, one for one, the text as written
    (exact duplicates dropped) for read-back."""
    if value is None:
        return (), ()
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise bad_request(f"must be a list of at most {MAX_LIST} CIDRs", field)
    out: dict[str, Network] = {}
    for i, s in enumerate(value):
        try:
            if not isinstance(s, str):
                raise ValueError
            _, slash, prefix = s.strip().partition("/")
            if slash and not (prefix.isascii() and prefix.isdigit()):  # Go takes a prefix length, no mask
                raise ValueError
            out.setdefault(s, ipaddress.ip_network(s.strip(), strict=False))
        except ValueError:
            raise bad_request(f"{s!r} is not an IPv4 or IPv6 address or CIDR such as 10.0.0.0/8",
                              f"{field}[{i}]") from None
    return tuple(out.values()), tuple(out)


#: Cloud's ``attributes`` (``postAccessPolicies_request_attributes``): per key, per field, the JSON type.
_ATTRIBUTE_FIELDS: Final[dict[str, dict[str, str]]] = {
    "lokiQueryPolicy": {"maxEntriesLimitPerQuery": "int", "maxQueryBytesRead": "bytes", "maxQueryInterval": "dur",
                        "maxQueryLength": "dur", "maxQueryLookback": "dur", "maxQueryTime": "dur",
                        "minimumLabelsNumber": "int", "requiredLabels": "strs", "queryTimeout": "dur"},
    "pdcConfiguration": {"limitedHosts": "strs"},
    # Our extension (gateway.limits): per-policy rates, shared by the policy's tokens, per replica.
    "gatewayLimits": {"requestsPerSecond": "num", "burst": "int", "writeBytesPerSecond": "int",
                      "concurrentQueries": "int"},
}
_MAX_ATTRIBUTE_TEXT: Final = 1024


def _attribute_ok(kind: str, v: Any) -> bool:
    if v is None:
        return True
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**31
    if kind == "num":
        return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 2**31
    if kind == "str":
        return isinstance(v, str) and len(v) <= _MAX_ATTRIBUTE_TEXT
    if kind == "dur":  # Loki reads these as Prometheus durations (X-Loki-Query-Limits): a bad one fails queries
        return isinstance(v, str) and (v == "" or lokiquery.parse_duration_ms(v.strip()) is not None)
    if kind == "bytes":
        return isinstance(v, str) and (v == "" or lokiquery.valid_bytes(v))
    return (isinstance(v, list) and len(v) <= MAX_LIST
            and all(isinstance(x, str) and len(x) <= _MAX_ATTRIBUTE_TEXT for x in v))


def attributes(value: Any) -> dict[str, Any] | None:
    """Cloud's policy ``attributes``: ``null`` removes them; each field has the spec's JSON type."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("attributes must be an object {lokiQueryPolicy, pdcConfiguration}", "attributes")
    for key, sub in value.items():
        fields = _ATTRIBUTE_FIELDS.get(key)
        if fields is None:
            raise bad_request(f"unknown field {key!r} (allowed: {', '.join(_ATTRIBUTE_FIELDS)})", f"attributes.{key}")
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise bad_request("must be an object", f"attributes.{key}")
        for name, v in sub.items():
            kind = fields.get(name)
            if kind is None:
                raise bad_request(f"unknown field {name!r}", f"attributes.{key}.{name}")
            if not _attribute_ok(kind, v):
                want = {"int": "an integer", "num": "a number >= 0", "str": "a string", "strs": "a list of strings",
                        "dur": "a duration such as 30d, 12h or 1h30m",
                        "bytes": "a size Loki reads: 500MB, 1GB or 1024 (no GiB, no decimals)"}[kind]
                raise bad_request(f"must be {want}", f"attributes.{key}.{name}")
    return value


def status(value: Any) -> str:
    if value not in ("active", "inactive"):
        raise bad_request("status must be 'active' or 'inactive'", "status")
    return str(value)


def uuid_str(value: Any, field: str) -> str:
    try:
        return str(uuid.UUID(str(value))) if isinstance(value, str) else _raise()
    except ValueError:
        raise bad_request(f"{field} must be a UUID", field) from None


def _raise() -> str:
    raise ValueError


def timestamp(value: Any, field: str, future: bool = False) -> datetime:
    """RFC 3339 with a time zone (``2030-01-01T00:00:00Z``)."""
    if not isinstance(value, str):
        raise bad_request(f"{field} must be an RFC 3339 timestamp such as 2030-01-01T00:00:00Z", field)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise bad_request(f"{field} must be an RFC 3339 timestamp such as 2030-01-01T00:00:00Z", field) from None
    if dt.tzinfo is None:
        raise bad_request(f"{field} must carry a time zone, e.g. a trailing Z", field)
    try:
        dt = dt.astimezone(UTC)
    except OverflowError:
        raise bad_request(f"{field} is out of range", field) from None
    if future and dt <= datetime.now(UTC):
        raise bad_request(f"{field} must be in the future", field)
    return dt
