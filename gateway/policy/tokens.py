"""The token wire format: ``glc_`` + unpadded URL-safe base64 of ``{"o": org, "i": token id, "k": secret,
"m": {"r": region}}``, compact JSON, keys in that order: exactly what ``encode`` writes.

There is one accepted spelling per token (the gateway has only ever issued this one): any other
(padding, the other base64 alphabet, junk characters, extra or reordered keys, whitespace) is
"malformed token". Secret scanners then see every usable token in its canonical form, and the
verified-token cache cannot be churned with spellings of one token.

The ``glc_`` prefix lets secret scanners (gitleaks, TruffleHog, GitHub) catch a leak;
the token id makes the lookup O(1); the 256-bit secret is stored only as SHA-256 (a
slow hash adds nothing for 256 random bits and would cost the hot path).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import uuid
from itertools import islice
from typing import Final, NamedTuple

PREFIX: Final = "glc_"
MAX_TOKEN_LEN: Final = 1024
SECRET_BYTES: Final = 32
MALFORMED: Final = "malformed token"
# One decoder and one compact encoder for every token (json.dumps with options builds an encoder per call).
_LOADS: Final = json.JSONDecoder().decode
_COMPACT: Final = json.JSONEncoder(separators=(",", ":")).encode
# The URL-safe alphabet to the standard one, and the standard alphabet's own '+', '/' and '=' (no spelling of ours)
# to '*', which strict base64 refuses: one translation, then strict decoding checks the alphabet.
_FROM_URLSAFE: Final = bytes.maketrans(b"-_+/=", b"+/***")
# The canonical body when no string needs an escape (what ``encode`` writes for ids, secrets and regions):
# JSON strings of printable ASCII but '"' and '\\', exactly what json.dumps leaves unescaped.
_PLAIN: Final = rb'"([ !#-\[\]-~]*)"'
_CANONICAL: Final = re.compile(rb'\{"o":%s,"i":%s,"k":%s,"m":\{"r":%s\}\}' % (_PLAIN, _PLAIN, _PLAIN, _PLAIN))
_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: The unused low bits of the last character of an unpadded body, by the body's length mod 4 (2: 4 bits,
#: 3: 2 bits): ``encode`` leaves them 0, so a character with any of them set is another spelling of the
#: same bytes. For a body of the URL-safe alphabet this is exactly "re-encoding the bytes gives it back".
_LOW_BITS: Final = {rest: {c: i & mask for i, c in enumerate(_ALPHABET)} for rest, mask in ((2, 0x0F), (3, 0x03))}


class TokenFormatError(ValueError):
    """The presented string is not a token of ours (never includes the token itself)."""


class DecodedToken(NamedTuple):
    """A decoded token (immutable; a tuple: built once per first use of a token, on the hot path)."""

    org_id: str
    token_id: str
    secret_hash: bytes


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def encode(org_id: str, token_id: str, secret: str, region: str) -> str:
    """Build the string handed to the user once."""
    body = json.dumps({"o": org_id, "i": token_id, "k": secret, "m": {"r": region}}, separators=(",", ":"))
    return PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode(token: str) -> DecodedToken:
    """Parse a presented token; raises TokenFormatError.

    Only tokens that proved their secret are cached (``remember``): agents repeat the same
    token, but a cache of whatever strings clients send would let them fill memory for free.
    """
    hit = _VERIFIED.get(token)
    if hit is not None:
        return hit
    if not isinstance(token, str) or not token.startswith(PREFIX) or len(token) > MAX_TOKEN_LEN:
        raise TokenFormatError(MALFORMED)
    return _decode(token)


def remember(token: str, decoded: DecodedToken) -> None:
    """Cache a token whose secret matched; revocation is unaffected (the id is looked up every time).
    Full, the oldest sixteenth goes (insertion order): emptying all 65,536 at once stalled the worker
    for about 5 ms, a sixteenth takes under 1 ms, and the tokens in use stay."""
    if len(_VERIFIED) >= MAX_VERIFIED and token not in _VERIFIED:
        for old in list(islice(_VERIFIED, MAX_VERIFIED // 16)):
            del _VERIFIED[old]
    _VERIFIED[token] = decoded


_VERIFIED: dict[str, DecodedToken] = {}
MAX_VERIFIED: Final = 65536
# The cold decode's callables bound once (a token's first use: each global and attribute look-up counts).
_SKIP: Final = len(PREFIX)
_PADDING: Final = (b"", b"", b"==", b"=")  # by the body's length mod 4 (1 is refused before)
_A2B: Final = binascii.a2b_base64
_SHA256: Final = hashlib.sha256
_NEW: Final = tuple.__new__  # DecodedToken(...) without the namedtuple's Python-level __new__


def _decode(token: str) -> DecodedToken:
    raw = token[_SKIP:]
    rest = len(raw) % 4
    # The body is the URL-safe alphabet only ([A-Za-z0-9_-]): strict base64 after the translation refuses any other
    # character (a non-ASCII one fails the encode), and a length of 1 more than a multiple of 4.
    try:
        body = _A2B(raw.encode("ascii").translate(_FROM_URLSAFE) + _PADDING[rest], strict_mode=True)
    except ValueError:  # (binascii.Error, UnicodeEncodeError)
        raise TokenFormatError(MALFORMED) from None
    if rest and _LOW_BITS[rest][raw[-1]]:
        raise TokenFormatError(MALFORMED)  # another base64 spelling of the same bytes (an empty body fails below)
    plain = _CANONICAL.fullmatch(body)
    if plain is not None:  # the canonical JSON of four strings without escapes: read them off
        org, tid, secret, _region = plain.groups()
        if not secret:
            raise TokenFormatError(MALFORMED)
        return _NEW(DecodedToken, (org.decode("ascii"), tid.decode("ascii"), _SHA256(secret).digest()))
    try:
        data = _LOADS(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TokenFormatError(MALFORMED) from None
    if not isinstance(data, dict) or list(data) != ["o", "i", "k", "m"]:
        raise TokenFormatError(MALFORMED)
    org, tid, secret, meta = data["o"], data["i"], data["k"], data["m"]
    if not (isinstance(org, str) and isinstance(tid, str) and isinstance(secret, str) and secret
            and isinstance(meta, dict) and list(meta) == ["r"] and isinstance(meta["r"], str)):
        raise TokenFormatError(MALFORMED)
    # Any other spelling of the same claims: ``encode`` of them must give the token back. That is ``body``'s
    # unpadded URL-safe base64 being exactly ``raw`` (checked above) and the JSON of the claims being
    # exactly ``body`` (same keys in the same order, compact, the same escapes).
    if _COMPACT(data).encode() != body:
        raise TokenFormatError(MALFORMED)
    try:  # JSON's "\ud800" is a lone surrogate: no UTF-8 for the hash, the logs or the store
        org.encode(), tid.encode(), meta["r"].encode()
        return DecodedToken(org, tid, hash_secret(secret))
    except UnicodeEncodeError:
        raise TokenFormatError(MALFORMED) from None


def well_formed_id(token_id: str) -> bool:
    """A token id as the gateway mints them: a lower-case hyphenated UUID (the read-through only looks these up)."""
    if len(token_id) != 36:
        return False
    try:
        return str(uuid.UUID(token_id)) == token_id
    except ValueError:
        return False


def secret_matches(presented_hash: bytes, stored_hash: bytes) -> bool:
    """Constant-time comparison of secret hashes."""
    return hmac.compare_digest(presented_hash, stored_hash)
