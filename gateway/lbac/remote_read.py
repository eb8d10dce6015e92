"""Remote read (``POST /api/v1/read``, snappy-compressed protobuf ``ReadRequest``) under label policies.

Placeholder: restricted remote reads in enforce mode are refused until the protobuf rewrite lands.
"""

from __future__ import annotations

from gateway.lbac import RewriteError
from gateway.policy.selector import Selector

MAX_READ_BODY = 4 * 1024 * 1024


def restrict_read_request(body: bytes, policies: tuple[Selector, ...]) -> bytes:
    """Return a snappy-compressed ReadRequest whose every query carries the policy matchers."""
    raise RewriteError("remote read cannot be restricted by label policies on this gateway yet")
