"""A corpus of unusual and malformed HTTP/1.1 requests, after the public request-smuggling research:
RFC 9112's framing rules (sections 6 and 7) and their known misreadings — James Kettle's "HTTP Desync
Attacks" (CL.TE, TE.CL, TE.TE obfuscations), "HTTP Request Smuggling" (Linhart et al., Watchfire 2005),
the chunk-extension and bare-LF desyncs of "Funky chunks" (2025), and the parser differentials
HTTP Garden reports (whitespace around lengths, obs-fold, NUL, bare CR, non-ASCII digits).

Each entry is the bytes a client sends, with ``{auth}`` where a valid credential goes: every request targets
a data-path route that needs a token, so that what a front forwards is what it framed. The oracle appends
one last, well-formed request (``SENTINEL``) so that a front still waiting for body bytes reads it as body,
exactly where a smuggled request would be read.
"""

from __future__ import annotations

from dataclasses import dataclass

PUSH = b"/api/v1/push"
QUERY = b"/prometheus/api/v1/query"
AUTH = b"{auth}"


@dataclass(frozen=True)
class Entry:
    family: str
    name: str
    data: bytes  # with AUTH where the Authorization header's value goes

    def requests(self) -> int:
        """How many request lines it holds, roughly (a multi-request entry is fuzzed at every byte)."""
        return self.data.count(b" HTTP/1.") + self.data.count(b" HTTP/2")


def req(method: bytes = b"POST", target: bytes = PUSH, fields: tuple[bytes, ...] = (), body: bytes = b"",
        version: bytes = b"HTTP/1.1", eol: bytes = b"\r\n", auth: bool = True) -> bytes:
    """One request: request line, Host, the credential, ``fields`` (whole lines, without their end), a blank
    line, ``body`` (as is: framing is the point)."""
    lines = [method + b" " + target + b" " + version, b"Host: gw"]
    if auth:
        lines.append(b"Authorization: " + AUTH)
    lines += fields
    return eol.join(lines) + eol + eol + body


def sentinel() -> bytes:
    return req(b"GET", QUERY + b"?query=sentinel", (b"Connection: close",))


CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"


def _content_length() -> list[Entry]:
    out = []
    values = [b"5", b" 5", b"5 ", b"  5  ", b"\t5", b"5\t", b"05", b"0000000005", b"+5", b"-5", b"5.0", b"5,5",
              b"5, 5", b"5 ,5", b"0x5", b"5 5", b"", b" ", b"\xd9\xa5", b"\xef\xbc\x95", b"4294967301",
              b"18446744073709551621", b"99999999999999999999999", b"5\x00", b"5\x0b", b"5\x0c", b"5\r",
              b"\"5\"", b"5;", b"five", b"0", b"7", b"3", b"1e1", b"5 \t "]
    for v in values:
        out.append(Entry("content-length value", repr(v), req(fields=(b"Content-Length: " + v,), body=b"hello")))
    for name in (b"content-length", b"CONTENT-LENGTH", b"Content-Length ", b"Content-Length\t", b"Content_Length",
                 b"Content-Length\x00", b" Content-Length", b"Content-Lengt", b"Content-Length:"):
        out.append(Entry("content-length name", repr(name), req(fields=(name + b": 5",), body=b"hello")))
    return out


def _duplicate_lengths() -> list[Entry]:
    pairs = [(b"5", b"5"), (b"5", b"6"), (b"6", b"5"), (b"5", b""), (b"", b"5"), (b"5", b"5 "), (b"0", b"5"),
             (b"5", b"0"), (b"05", b"5")]
    out = [Entry("duplicate length", f"{a!r} then {b!r}",
                 req(fields=(b"Content-Length: " + a, b"Content-Length: " + b), body=b"hello")) for a, b in pairs]
    out.append(Entry("duplicate length", "list in one field, then one",
                     req(fields=(b"Content-Length: 5, 5", b"Content-Length: 5"), body=b"hello")))
    return out


def _transfer_encoding() -> list[Entry]:
    out = []
    values = [b"chunked", b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"\tchunked", b"chunked\t",
              b"chunked, chunked", b"gzip, chunked", b"chunked, gzip", b"identity, chunked", b"identity", b"x",
              b"xchunked", b"chunkedx", b"chunked;q=1", b"\"chunked\"", b"chunk", b"chunked\x00", b"chunked\x0b",
              b"chunked,", b", chunked", b"gzip,chunked", b"ch\xc3\xbcnked", b"chunked\r", b"", b"cHuNkEd",
              b"chunked , gzip", b"deflate"]
    for v in values:
        out.append(Entry("transfer-encoding value", repr(v),
                         req(fields=(b"Transfer-Encoding: " + v,), body=CHUNKED)))
    for name in (b"transfer-encoding", b"Transfer-Encoding ", b"Transfer-Encoding\t", b"Transfer_Encoding",
                 b" Transfer-Encoding", b"Transfer-Encodin", b"Transfer-Encoding\x00", b"TE"):
        out.append(Entry("transfer-encoding name", repr(name), req(fields=(name + b": chunked",), body=CHUNKED)))
    for a, b in ((b"chunked", b"chunked"), (b"chunked", b"identity"), (b"gzip", b"chunked"), (b"chunked", b"x"),
                 (b"identity", b"chunked")):
        out.append(Entry("transfer-encoding twice", f"{a!r} then {b!r}",
                         req(fields=(b"Transfer-Encoding: " + a, b"Transfer-Encoding: " + b), body=CHUNKED)))
    return out


def _cl_and_te() -> list[Entry]:
    """Kettle's CL.TE and TE.CL, and the combinations around them."""
    smuggled = req(b"GET", QUERY + b"?query=smuggled", auth=True)
    cases = [
        ("CL.TE", (b"Content-Length: 13", b"Transfer-Encoding: chunked"), b"0\r\n\r\nSMUGGLED"),
        ("TE.CL", (b"Transfer-Encoding: chunked", b"Content-Length: 3"), b"8\r\nSMUGGLED\r\n0\r\n\r\n"),
        ("CL 0 and TE", (b"Content-Length: 0", b"Transfer-Encoding: chunked"), CHUNKED),
        ("CL matching the chunked bytes", (b"Content-Length: %d" % len(CHUNKED), b"Transfer-Encoding: chunked"),
         CHUNKED),
        ("TE identity and CL", (b"Transfer-Encoding: identity", b"Content-Length: 5"), b"hello"),
        ("TE x and CL", (b"Transfer-Encoding: x", b"Content-Length: 5"), b"hello"),
        ("TE obfuscated by a space and CL", (b"Transfer-Encoding : chunked", b"Content-Length: 5"), b"hello"),
        ("TE xchunked and CL", (b"Transfer-Encoding: xchunked", b"Content-Length: %d" % len(CHUNKED)), CHUNKED),
        ("TE tab and CL", (b"Transfer-Encoding:\tchunked", b"Content-Length: 3"), CHUNKED),
        ("CL then TE twice", (b"Content-Length: 5", b"Transfer-Encoding: chunked", b"Transfer-Encoding: x"),
         b"hello"),
        ("CL.TE smuggling a request", (b"Content-Length: %d" % (5 + len(smuggled)), b"Transfer-Encoding: chunked"),
         b"0\r\n\r\n" + smuggled),
        ("TE.CL smuggling a request", (b"Transfer-Encoding: chunked", b"Content-Length: 4"),
         b"%x\r\n%b\r\n0\r\n\r\n" % (len(smuggled), smuggled)),
        ("TE in an obs-fold after CL", (b"Content-Length: 5", b"X: y", b" Transfer-Encoding: chunked"), b"hello"),
    ]
    return [Entry("CL and TE", name, req(fields=fields, body=body)) for name, fields, body in cases]


def _chunks() -> list[Entry]:
    te = (b"Transfer-Encoding: chunked",)
    bodies = {
        "leading zeros": b"0005\r\nhello\r\n0\r\n\r\n",
        "many leading zeros": b"0000000000000000000005\r\nhello\r\n0\r\n\r\n",
        "0x prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
        "space after size": b"5 \r\nhello\r\n0\r\n\r\n",
        "tab after size": b"5\t\r\nhello\r\n0\r\n\r\n",
        "space before size": b" 5\r\nhello\r\n0\r\n\r\n",
        "extension": b"5;ext\r\nhello\r\n0\r\n\r\n",
        "extension with value": b"5;ext=val\r\nhello\r\n0\r\n\r\n",
        "quoted extension": b"5;ext=\"a b\"\r\nhello\r\n0\r\n\r\n",
        "space before extension": b"5 ;ext\r\nhello\r\n0\r\n\r\n",
        "NUL in extension": b"5;e\x00\r\nhello\r\n0\r\n\r\n",
        "bare LF in extension": b"5;e\nx\r\nhello\r\n0\r\n\r\n",
        "long extension": b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n",
        "extension on the last chunk": b"5\r\nhello\r\n0;e=1\r\n\r\n",
        "size overflows 64 bits": b"10000000000000005\r\nhello\r\n0\r\n\r\n",
        "size of 16 f": b"ffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        "negative size": b"-5\r\nhello\r\n0\r\n\r\n",
        "plus size": b"+5\r\nhello\r\n0\r\n\r\n",
        "upper-case hex": b"A\r\nhellohello\r\n0\r\n\r\n",
        "lower-case hex": b"a\r\nhellohello\r\n0\r\n\r\n",
        "bare LF after size": b"5\nhello\r\n0\r\n\r\n",
        "bare LF after data": b"5\r\nhello\n0\r\n\r\n",
        "bare CR after data": b"5\r\nhello\r0\r\n\r\n",
        "no CRLF after data": b"5\r\nhello0\r\n\r\n",
        "data longer than size": b"3\r\nhello\r\n0\r\n\r\n",
        "data shorter than size": b"7\r\nhello\r\n0\r\n\r\n",
        "trailer field": b"5\r\nhello\r\n0\r\nX-Trailer: y\r\n\r\n",
        "Content-Length trailer": b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n",
        "bad trailer": b"5\r\nhello\r\n0\r\nX Trailer: y\r\n\r\n",
        "last chunk 000": b"5\r\nhello\r\n000\r\n\r\n",
        "empty size line": b"\r\nhello\r\n0\r\n\r\n",
        "no last chunk CRLF": b"5\r\nhello\r\n0\r\n",
        "two chunks": b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
        "zero chunks": b"0\r\n\r\n",
        "bare LF at the end": b"5\r\nhello\r\n0\n\n",
        "size with a g": b"5g\r\nhello\r\n0\r\n\r\n",
    }
    return [Entry("chunks", name, req(fields=te, body=body)) for name, body in bodies.items()]


def _fields() -> list[Entry]:
    cl = b"Content-Length: 5"
    cases = {
        "obs-fold": (b"X-A: a", b" b", cl),
        "obs-fold with a tab": (b"X-A: a", b"\tb", cl),
        "obs-fold continuing the length": (b"Content-Length:", b" 5"),
        "obs-fold continuing transfer-encoding": (b"Transfer-Encoding:", b" chunked"),
        "first field folded": (b" X-A: a", cl),
        "field without a colon": (b"X-A", cl),
        "empty field name": (b": a", cl),
        "space in a field name": (b"X A: a", cl),
        "NUL in a value": (b"X-A: a\x00b", cl),
        "bare CR in a value": (b"X-A: a\rb", cl),
        "DEL in a value": (b"X-A: a\x7fb", cl),
        "UTF-8 in a value": (b"X-A: caf\xc3\xa9", cl),
        "latin-1 byte in a value": (b"X-A: caf\xe9", cl),
        "VT in a value": (b"X-A: a\x0bb", cl),
        "FF in a value": (b"X-A: a\x0cb", cl),
        "tab in a value": (b"X-A: a\tb", cl),
        "non-ASCII in a name": (b"X-\xc3\xa9: a", cl),
        "empty value": (b"X-A:", cl),
        "value of spaces": (b"X-A:    ", cl),
        "trailing whitespace everywhere": (b"X-A: a \t", b"Content-Length: 5 \t"),
    }
    return [Entry("field syntax", name, req(fields=fields, body=b"hello")) for name, fields in cases.items()]


def _line_ends() -> list[Entry]:
    def raw(text: bytes) -> bytes:
        return text.replace(b"AUTH", AUTH)
    cases = {
        "bare LF everywhere": req(fields=(b"Content-Length: 5",), body=b"hello", eol=b"\n"),
        "bare LF ends the request line": raw(b"POST /api/v1/push HTTP/1.1\nHost: gw\r\nAuthorization: AUTH\r\n"
                                             b"Content-Length: 5\r\n\r\nhello"),
        "bare LF ends one field": raw(b"POST /api/v1/push HTTP/1.1\r\nHost: gw\nAuthorization: AUTH\r\n"
                                      b"Content-Length: 5\r\n\r\nhello"),
        "bare LF ends the head": raw(b"POST /api/v1/push HTTP/1.1\r\nHost: gw\r\nAuthorization: AUTH\r\n"
                                     b"Content-Length: 5\r\n\nhello"),
        "bare CR everywhere": req(fields=(b"Content-Length: 5",), body=b"hello", eol=b"\r"),
        "bare CR ends one field": raw(b"POST /api/v1/push HTTP/1.1\r\nHost: gw\rAuthorization: AUTH\r\n"
                                      b"Content-Length: 5\r\n\r\nhello"),
        "CR CR LF": raw(b"POST /api/v1/push HTTP/1.1\r\r\nHost: gw\r\nAuthorization: AUTH\r\n"
                        b"Content-Length: 5\r\n\r\nhello"),
        "LF CR": raw(b"POST /api/v1/push HTTP/1.1\n\rHost: gw\r\nAuthorization: AUTH\r\n"
                     b"Content-Length: 5\r\n\r\nhello"),
        "empty lines before the request": b"\r\n\r\n" + req(fields=(b"Content-Length: 5",), body=b"hello"),
        "bare LF before the request": b"\n" + req(fields=(b"Content-Length: 5",), body=b"hello"),
    }
    return [Entry("line ends", name, data) for name, data in cases.items()]


def _nul() -> list[Entry]:
    cases = {
        "in the method": req(b"GE\x00T", QUERY + b"?query=up"),
        "in the target": req(b"GET", QUERY + b"?query=u\x00p"),
        "in the version": req(b"GET", QUERY + b"?query=up", version=b"HTTP/1.\x001"),
        "in a field name": req(b"GET", QUERY + b"?query=up", (b"X-\x00A: a",)),
        "in the body": req(fields=(b"Content-Length: 5",), body=b"he\x00lo"),
        "before the request": b"\x00" + req(b"GET", QUERY + b"?query=up"),
    }
    return [Entry("NUL", name, data) for name, data in cases.items()]


def _long_lines() -> list[Entry]:
    q = QUERY + b"?query="
    cases = {
        "target of 8000 bytes": req(b"GET", q + b"a" * (8000 - len(q))),
        "target of 9000 bytes": req(b"GET", q + b"a" * (9000 - len(q))),
        "target of 70000 bytes": req(b"GET", q + b"a" * 70000),
        "field of 8000 bytes": req(b"GET", q + b"up", (b"X-A: " + b"a" * 7990,)),
        "field of 9000 bytes": req(b"GET", q + b"up", (b"X-A: " + b"a" * 9000,)),
        "field name of 9000 bytes": req(b"GET", q + b"up", (b"X" * 9000 + b": a",)),
        "100 fields": req(b"GET", q + b"up", tuple(b"X-%d: a" % i for i in range(100))),
        "200 fields": req(b"GET", q + b"up", tuple(b"X-%d: a" % i for i in range(200))),
        "head of 70 KiB": req(b"GET", q + b"up", tuple(b"X-%d: " % i + b"a" * 7000 for i in range(10))),
        "method of 100 bytes": req(b"G" * 100, q + b"up"),
    }
    return [Entry("long lines", name, data) for name, data in cases.items()]


def _versions() -> list[Entry]:
    get = QUERY + b"?query=up"
    cases = {
        "HTTP/1.0 keep-alive, pipelined": req(b"GET", get, (b"Connection: keep-alive",), version=b"HTTP/1.0")
        + req(b"GET", get + b"2", version=b"HTTP/1.0"),
        "HTTP/1.0 without keep-alive, pipelined": req(b"GET", get, version=b"HTTP/1.0") + req(b"GET", get + b"2"),
        "HTTP/1.0 with a length": req(fields=(b"Content-Length: 5",), body=b"hello", version=b"HTTP/1.0"),
        "HTTP/1.0 with chunked": req(fields=(b"Transfer-Encoding: chunked",), body=CHUNKED, version=b"HTTP/1.0"),
        "HTTP/1.0 POST without a length": req(body=b"hello", version=b"HTTP/1.0"),
        "HTTP/0.9": b"GET " + get + b"\r\n",
        "HTTP/2.0 request line": req(b"GET", get, version=b"HTTP/2.0"),
        "HTTP/1.2": req(b"GET", get, version=b"HTTP/1.2"),
        "HTTP/3.0": req(b"GET", get, version=b"HTTP/3.0"),
        "lower-case version": req(b"GET", get, version=b"http/1.1"),
        "two-digit version": req(b"GET", get, version=b"HTTP/01.1"),
        "space after the version": req(b"GET", get, version=b"HTTP/1.1 "),
        "Connection: close, then another request": req(b"GET", get, (b"Connection: close",)) + req(b"GET", get + b"2"),
        "keep-alive twice, then close": req(b"GET", get, (b"Connection: keep-alive",))
        + req(b"GET", get + b"2", (b"Connection: keep-alive",)),
    }
    return [Entry("versions", name, data) for name, data in cases.items()]


def _expect() -> list[Entry]:
    cl = b"Content-Length: 5"
    cases = {
        "100-continue with a body": req(fields=(b"Expect: 100-continue", cl), body=b"hello"),
        "100-continue, chunked": req(fields=(b"Expect: 100-continue", b"Transfer-Encoding: chunked"), body=CHUNKED),
        "100-Continue capitalised": req(fields=(b"Expect: 100-Continue", cl), body=b"hello"),
        "100-continue on a GET": req(b"GET", QUERY + b"?query=up", (b"Expect: 100-continue",)),
        "200-ok": req(fields=(b"Expect: 200-ok", cl), body=b"hello"),
        "100-continue on HTTP/1.0": req(fields=(b"Expect: 100-continue", cl), body=b"hello", version=b"HTTP/1.0"),
        "100-continue twice": req(fields=(b"Expect: 100-continue", b"Expect: 100-continue", cl), body=b"hello"),
        "empty Expect": req(fields=(b"Expect:", cl), body=b"hello"),
    }
    return [Entry("Expect", name, data) for name, data in cases.items()]


def _pipelines() -> list[Entry]:
    get = QUERY + b"?query="
    cl = b"Content-Length: 5"
    cases = {
        "GET, GET": req(b"GET", get + b"a") + req(b"GET", get + b"b"),
        "POST, GET": req(fields=(cl,), body=b"hello") + req(b"GET", get + b"b"),
        "chunked POST, GET": req(fields=(b"Transfer-Encoding: chunked",), body=CHUNKED) + req(b"GET", get + b"b"),
        "GET with a body, GET": req(b"GET", get + b"a", (cl,), b"hello") + req(b"GET", get + b"b"),
        "GET with unframed bytes, GET": req(b"GET", get + b"a", body=b"hello") + req(b"GET", get + b"b"),
        "POST with a short length, GET": req(fields=(b"Content-Length: 3",), body=b"hello")
        + req(b"GET", get + b"b"),
        "POST with a long length, GET": req(fields=(b"Content-Length: 10",), body=b"hello")
        + req(b"GET", get + b"b"),
        "three in a row": req(b"GET", get + b"a") + req(fields=(cl,), body=b"hello") + req(b"GET", get + b"c"),
        "POST, chunked POST, GET": req(fields=(cl,), body=b"hello")
        + req(fields=(b"Transfer-Encoding: chunked",), body=b"2\r\nab\r\n1;x\r\nc\r\n0\r\n\r\n")
        + req(b"GET", get + b"c"),
        "a good request, then a bad one": req(b"GET", get + b"a") + req(b"GET", get + b"b", (b"X-A: a\x00",)),
        "a good request, then garbage": req(b"GET", get + b"a") + b"\x16\x03\x01\x00\xa5",
        "a length-0 POST, GET": req(fields=(b"Content-Length: 0",)) + req(b"GET", get + b"b"),
        "a chunked POST with a trailer, GET": req(fields=(b"Transfer-Encoding: chunked",),
                                                  body=b"5\r\nhello\r\n0\r\nX: y\r\n\r\n") + req(b"GET", get + b"b"),
        "an unauthenticated POST, GET": req(fields=(cl,), body=b"hello", auth=False) + req(b"GET", get + b"b"),
        "an unauthenticated padded length, GET": req(fields=(b"Content-Length: 5 ",), body=b"hello", auth=False)
        + req(b"GET", get + b"b"),
        "a padded length, GET": req(fields=(b"Content-Length: 5 ",), body=b"hello") + req(b"GET", get + b"b"),
        "GET, health, GET": req(b"GET", get + b"a") + req(b"GET", b"/health", auth=False) + req(b"GET", get + b"c"),
        "POST, health": req(fields=(cl,), body=b"hello") + req(b"GET", b"/health", auth=False),
        "health, chunked POST": req(b"GET", b"/health", auth=False)
        + req(fields=(b"Transfer-Encoding: chunked",), body=CHUNKED),
        "HEAD-less GET with Content-Length 0, GET": req(b"GET", get + b"a", (b"Content-Length: 0",))
        + req(b"GET", get + b"b"),
    }
    return [Entry("pipelining", name, data) for name, data in cases.items()]


def _targets() -> list[Entry]:
    cases = {
        "absolute form": b"http://gw" + QUERY + b"?query=up",
        "absolute form, https": b"https://gw" + QUERY + b"?query=up",
        "absolute form, other host": b"http://other.example" + QUERY + b"?query=up",
        "asterisk": b"*",
        "fragment in the query": QUERY + b"?query=up#frag",
        "fragment in the path": QUERY + b"#frag?query=up",
        "raw UTF-8 in the query": QUERY + b"?query=caf\xc3\xa9",
        "raw UTF-8 in the path": b"/prometheus/api/v1/qu\xc3\xa9ry?query=up",
        "raw latin-1 in the query": QUERY + b"?query=caf\xe9",
        "percent-encoded UTF-8": QUERY + b"?query=caf%C3%A9",
        "percent-encoded NUL": QUERY + b"?query=a%00b",
        "double slash": b"/" + QUERY + b"?query=up",
        "dot segments": b"/prometheus/api/../api/v1/query?query=up",
        "encoded slash": b"/prometheus/api%2Fv1/query?query=up",
        "encoded question mark": QUERY + b"%3Fquery=up",
        "backslash": b"/prometheus\\api/v1/query?query=up",
        "braces and pipe": QUERY + b"?query={a=\"b\"}|x",
        "empty query": QUERY + b"?",
        "tab in the target": QUERY + b"?query=a\tb",
        "authority form": b"gw:80",
        "no leading slash": b"prometheus/api/v1/query?query=up",
    }
    out = [Entry("targets", name, req(b"GET", target)) for name, target in cases.items()]
    out.append(Entry("targets", "OPTIONS *", req(b"OPTIONS", b"*")))
    out.append(Entry("targets", "CONNECT authority", req(b"CONNECT", b"gw:80")))
    return out


def _methods() -> list[Entry]:
    get = QUERY + b"?query=up"
    cases = {
        "lower-case": req(b"get", get),
        "unknown": req(b"FOO", get),
        "two spaces after": b"GET  " + get + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: {auth}\r\n\r\n",
        "tab after": b"GET\t" + get + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: {auth}\r\n\r\n",
        "leading space": b" " + req(b"GET", get),
        "TRACE": req(b"TRACE", get),
        "PRI": req(b"PRI", get),
        "POST with a query": req(b"POST", get, (b"Content-Length: 0",)),
        "PUT push": req(b"PUT", PUSH, (b"Content-Length: 5",), b"hello"),
        "OPTIONS with a length": req(b"OPTIONS", get, (b"Content-Length: 5",), b"hello"),
        "DELETE with a length": req(b"DELETE", get, (b"Content-Length: 5",), b"hello"),
    }
    return [Entry("methods", name, data) for name, data in cases.items()]


def _hosts() -> list[Entry]:
    get = QUERY + b"?query=up"
    line = b"GET " + get + b" HTTP/1.1\r\nAuthorization: {auth}\r\n"
    cases = {
        "no Host": line + b"\r\n",
        "two Hosts": line + b"Host: a\r\nHost: b\r\n\r\n",
        "Host with a space": line + b"Host: a b\r\n\r\n",
        "empty Host": line + b"Host:\r\n\r\n",
        "Host with a slash": line + b"Host: a/b\r\n\r\n",
    }
    return [Entry("hosts", name, data) for name, data in cases.items()]


def corpus() -> list[Entry]:
    return [*_content_length(), *_duplicate_lengths(), *_transfer_encoding(), *_cl_and_te(), *_chunks(),
            *_fields(), *_line_ends(), *_nul(), *_long_lines(), *_versions(), *_expect(), *_pipelines(),
            *_targets(), *_methods(), *_hosts()]
