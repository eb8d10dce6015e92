"""Schemathesis hooks for tests/test_openapi.py (loaded through SCHEMATHESIS_HOOKS).

Every other request is made valid where the run cannot know what is: on Cloud paths no other org's
``orgId`` (a 403) and the test config's region (else a 409), and the access policies and tokens it creates
get a realm of org 1, no IP ranges or attributes, a fresh printable name and no expiry. Creations then
succeed often enough for the stateful phase to follow the document's links to what they created; the
other half of the requests go exactly as generated."""

from __future__ import annotations

import itertools
from typing import Any

import schemathesis

REGION = "local"  # tests/conftest.py's TEST_CONFIG
#: (method, path) of the creations whose bodies are made valid, with the fields set to valid values.
_CREATES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/accesspolicies"): {"realms": [{"type": "org", "identifier": "1"}], "conditions": None,
                                     "attributes": None},
    ("POST", "/v1/tokens"): {"expiresAt": None},
}
_SEEN = itertools.count()


def _printable(value: Any) -> bool:
    return isinstance(value, str) and bool(value) and value.isprintable() and value.strip() == value


@schemathesis.hook
def before_call(context: Any, case: Any, **kwargs: Any) -> None:
    if not case.path.startswith("/v1/") or next(_SEEN) % 2:
        return
    if isinstance(case.query, dict):
        case.query.pop("orgId", None)
        if "region" in case.query:
            case.query["region"] = REGION
    valid = _CREATES.get((case.method.upper(), case.path))
    body = case.body
    if valid is None or not isinstance(body, dict):
        return
    body.update(valid)
    name = body.get("name")
    body["name"] = f"{name[:200]}-{next(_SEEN)}" if _printable(name) else f"fuzzed-{next(_SEEN)}"  # fresh
    if "displayName" in body and not _printable(body["displayName"]):
        body["displayName"] = body["name"]
