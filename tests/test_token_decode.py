"""``tokens.decode``'s two readings of a token body: the plain canonical JSON read off by a pattern, and
anything else through the JSON parser and the canonical-form check; both give what ``encode`` put in."""

from __future__ import annotations

import base64

import pytest

from gateway.policy import tokens


@pytest.mark.parametrize(("org", "secret", "region"), [
    ("1", tokens.new_secret(), "local"),  # what the gateway issues: read off by the pattern
    ("1", 'se"cr\\et', "prod-eu"),  # escapes: the JSON parser's reading
    ("ü", "s\u00e9cret\x7f", "r"),  # non-ASCII (escaped as \\u....), and DEL (left as it is)
    ("1", " ~!#[]", "x"),  # the edges of the pattern's character class
])
def test_a_token_decodes_to_what_was_encoded(org: str, secret: str, region: str) -> None:
    tok = tokens.encode(org, "00000000-0000-0001-0000-000000000001", secret, region)
    d = tokens._decode(tok)
    assert (d.org_id, d.token_id, d.secret_hash) == (org, "00000000-0000-0001-0000-000000000001",
                                                     tokens.hash_secret(secret))


def _spell(body: bytes, pad: bool = False) -> str:
    text = base64.urlsafe_b64encode(body).decode()
    return "glc_" + (text if pad else text.rstrip("="))


@pytest.mark.parametrize("spelling", [
    _spell(b'{"o":"12","i":"a","k":"s","m":{"r":"x"}}', pad=True),  # padded (a plain body otherwise)
    _spell(b'{"o": "1","i":"a","k":"s","m":{"r":"x"}}'),  # a space
    _spell(b'{"o":"\\u0031","i":"a","k":"s","m":{"r":"x"}}'),  # an escape json.dumps would not write
    _spell(b'{"o":"1","i":"a","k":"","m":{"r":"x"}}'),  # no secret
    _spell(b'{"i":"a","o":"1","k":"s","m":{"r":"x"}}'),  # keys reordered
    _spell(b'{"o":"1","i":"a","k":"s","m":{"r":"x"}}')[:-1] + "F",  # other trailing bits, same bytes
])
def test_other_spellings_are_refused(spelling: str) -> None:
    with pytest.raises(tokens.TokenFormatError, match="^malformed token$"):
        tokens._decode(spelling)


def test_the_last_character_check_is_exactly_the_re_encoding_check() -> None:
    """``_decode`` refuses a body whose last character has unused bits set instead of re-encoding the bytes:
    for every body of the URL-safe alphabet (each length mod 4, every last character) the two agree."""
    import os
    for n in range(1, 13):
        raw = base64.urlsafe_b64encode(os.urandom(n)).decode().rstrip("=")
        rest = len(raw) % 4
        for last in tokens._ALPHABET:
            spelling = raw[:-1] + last
            data = base64.urlsafe_b64decode(spelling + "=" * (-len(spelling) % 4))
            same = base64.urlsafe_b64encode(data).decode().rstrip("=") == spelling
            assert same == (not rest or not tokens._LOW_BITS[rest][last]), (spelling, rest)


def test_the_verified_token_cache_is_bounded_and_drops_its_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_VERIFIED", {})
    monkeypatch.setattr(tokens, "MAX_VERIFIED", 32)
    decoded = tokens.DecodedToken("1", "a", b"x")
    for i in range(40):
        tokens.remember(f"t{i}", decoded)
    assert len(tokens._VERIFIED) <= 32
    assert "t39" in tokens._VERIFIED and "t0" not in tokens._VERIFIED  # the newest kept, the oldest gone
    assert list(tokens._VERIFIED) == sorted(tokens._VERIFIED, key=lambda k: int(k[1:]))
