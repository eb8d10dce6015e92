"""The policy form: what the browser posts, checked field by field with the API's own validators.

The API stops at the first bad field; a form should show every message at once, each beside
its field, so each field (and each line of a multi-line field) is validated on its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from multidict import MultiDictProxy

from gateway.admin import validate as v
from gateway.admin.errors import ApiError
from gateway.config import Config
from gateway.policy.model import AccessPolicy, Network, Realm
from gateway.store import AdminScope
from gateway.web.limitsform import form_texts

T = TypeVar("T")
_REALM_INDEX = re.compile(r"^realms\[(\d+)\]")


@dataclass(frozen=True, slots=True)
class RealmChoice:
    """A realm the signed-in admin may pick: ``key`` is ``type:identifier``."""

    type: str
    identifier: str
    label: str
    configured: bool = True

    @property
    def key(self) -> str:
        return f"{self.type}:{self.identifier}"


def realm_choices(cfg: Config, scope: AdminScope, keep: tuple[Realm, ...] = ()) -> list[RealmChoice]:
    """The org and stacks of the admin's org within its reach, plus realms a policy already has."""
    out: list[RealmChoice] = []
    org = cfg.orgs_by_id.get(scope.org_id)
    if org is not None:
        if scope.whole_org:
            out.append(RealmChoice("org", org.id, f"Org {org.name} ({org.id}): every stack"))
        for st in org.stacks:
            if scope.whole_org or st.id in scope.stacks:
                out.append(RealmChoice("stack", st.id, f"Stack {st.name} ({st.id})"))
    known = {c.key for c in out}
    for r in keep:
        if f"{r.type}:{r.identifier}" not in known:
            out.append(RealmChoice(r.type, r.identifier, f"{r.type.capitalize()} {r.identifier}", configured=False))
    return out


def lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _line(as_written: str, fallback: str) -> str:
    """A selector or subnet as the API client wrote it (so saving the form keeps it), unless it cannot
    stand on one line of the form."""
    return as_written if "\n" not in as_written and as_written == as_written.strip() else fallback


@dataclass
class PolicyForm:
    """The form's values as the user sees them (text), and the messages per field."""

    name: str = ""
    display_name: str = ""
    scopes: set[str] = field(default_factory=set)
    realms: dict[str, str] = field(default_factory=dict)  # checked realm key -> selectors, one per line
    unticked: dict[str, str] = field(default_factory=dict)  # selectors typed for a realm left unticked
    subnets: str = ""
    status: str = "active"
    limits: dict[str, str] = field(default_factory=dict)  # gateway.web.limitsform: "<attribute>.<field>" -> text
    errors: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_policy(cls, p: AccessPolicy) -> PolicyForm:
        return cls(name=p.name, display_name=p.display_name, scopes=set(p.scopes),
                   realms={f"{r.type}:{r.identifier}": "\n".join(_line(s.text, str(s)) for s in r.label_policies)
                           for r in p.realms},
                   subnets="\n".join(_line(t, t.strip()) for t in p.subnet_text()), status=p.status,
                   limits=form_texts(p.attributes_json))

    @classmethod
    def from_post(cls, form: MultiDictProxy[Any], name: str | None = None) -> PolicyForm:
        def text(key: str) -> str:
            val = form.get(key, "")
            return val if isinstance(val, str) else ""
        ticked = {k: text(f"selectors:{k}") for k in form.getall("realm", []) if isinstance(k, str)}
        ticks = {s for s in form.getall("scope", []) if isinstance(s, str)}
        typed = {k.removeprefix("selectors:"): val for k, val in form.items()
                 if k.startswith("selectors:") and k.removeprefix("selectors:") not in ticked
                 and isinstance(val, str) and val.strip()}
        return cls(name=name if name is not None else text("name").strip(),
                   display_name=text("displayName").strip(),
                   scopes=ticks | set(text("moreScopes").split()),  # ticked, and any typed in (Cloud's)
                   realms=ticked, unticked=typed, subnets=text("subnets"), status=text("status") or "active",
                   limits={k.removeprefix("limit:"): text(k) for k in form if k.startswith("limit:")})

    def error(self, key: str, message: str) -> None:
        self.errors.setdefault(key, []).append(message)

    def _try(self, key: str, fn: Callable[[], T], message: str | None = None) -> T | None:
        try:
            return fn()
        except ApiError as exc:
            self.error(key, message or exc.message)
            return None


@dataclass(frozen=True, slots=True)
class PolicyValues:
    """A validated form, ready for the store."""

    name: str
    display_name: str
    scopes: frozenset[str]
    realms: tuple[Realm, ...]
    subnets: tuple[Network, ...]
    status: str


def validate(f: PolicyForm, cfg: Config, scope: AdminScope) -> PolicyValues | None:
    """Check every field with the API's validators; None when ``f.errors`` has messages."""
    name = f._try("name", lambda: v.name(f.name))
    display = f._try("displayName", lambda: v.display_name(f.display_name or None, f.name))
    scopes = f._try("scopes", lambda: v.scopes(sorted(f.scopes)),
                    None if f.scopes else "Choose at least one scope.")
    status = f._try("status", lambda: v.status(f.status))

    body: list[dict[str, Any]] = []
    keys: list[str] = []
    for key, text in f.realms.items():
        rtype, _, ident = key.partition(":")
        sels = lines(text)
        for i, sel in enumerate(sels, 1):
            try:
                v.label_policies([{"selector": sel}], "selector")
            except ApiError as exc:
                f.error(f"realm:{key}", f"line {i}: {exc.message}")
        if f"realm:{key}" not in f.errors:  # each line is fine; now the list as a whole (its length)
            try:
                v.label_policies([{"selector": s} for s in sels], "selectors")
            except ApiError as exc:
                f.error(f"realm:{key}", exc.message)
        body.append({"type": rtype, "identifier": ident, "labelPolicies": [{"selector": s} for s in sels]})
        keys.append(key)
    for key in f.unticked:  # never drop what was typed, and never widen access by ticking a realm for the user
        f.error(f"realm:{key}", "Label selectors are typed here but this realm is not ticked: tick it to apply "
                "them, or clear them.")
    realms: tuple[Realm, ...] | None = None
    if not body:
        f.error("realms", "Choose at least one realm.")
    elif not any(k.startswith("realm:") for k in f.errors):
        try:
            realms = v.realms(body, cfg, scope)
        except ApiError as exc:
            m = _REALM_INDEX.match(exc.field or "")
            f.error(f"realm:{keys[int(m.group(1))]}" if m else "realms", exc.message)

    nets = lines(f.subnets)
    for i, net in enumerate(nets, 1):
        try:
            v.subnets([net], "subnets")
        except ApiError as exc:
            f.error("subnets", f"line {i}: {exc.message}")
    subnets = None if "subnets" in f.errors else f._try("subnets", lambda: v.subnets(nets, "subnets"))

    if f.errors or name is None or display is None or scopes is None or realms is None or status is None \
            or subnets is None:
        return None
    return PolicyValues(name, display, scopes, realms, subnets, status)
