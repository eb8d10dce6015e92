"""The harness of the framing oracle (tests/e2e/test_framing_oracle.py): a recording upstream, Debian's nginx
as a plain reverse proxy in front of it, and a client that sends raw bytes and reads the answers.

The upstream is raw asyncio and httptools on a thread of its own: it records the method, target and body of
every request it receives (nginx and the gateway both send well-formed HTTP/1.1) with the client address
the front puts in X-Forwarded-For, and answers 200. A run binds its client socket to an address of its own
on 127.0.0.0/8, so runs can go in parallel and every upstream request is still attributed to its run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
ANSWER = b'{"status":"success","data":{"resultType":"vector","result":[]}}'

Forwarded = tuple[str, str, bytes]  # method, target, body


class _UpstreamConn(asyncio.Protocol):
    def __init__(self, up: Upstream):
        self.up = up
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._xff = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.up.record("?", ("PARSE-ERROR", str(exc), data[:200]))
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self._url, self._body, self._xff = b"", [], ""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-forwarded-for":
            self._xff = value.decode("latin-1").rpartition(",")[2].strip()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        self.up.record(self._xff, (method, self._url.decode("latin-1"), b"".join(self._body)))
        body = b"" if method == "HEAD" else ANSWER
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                                 % (len(ANSWER), body))


@dataclass
class Upstream:
    """The recording upstream (see the module docstring); ``start`` returns its port."""

    seen: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)
    loop: asyncio.AbstractEventLoop | None = None
    port: int = 0

    def record(self, client: str, what: Any) -> None:
        with self.lock:
            self.seen[client].append(what)

    def take(self, client: str) -> list[Any]:
        with self.lock:
            return self.seen.pop(client, [])

    def start(self) -> int:
        ready = threading.Event()

        def run() -> None:
            loop = self.loop = asyncio.new_event_loop()
            server = loop.run_until_complete(loop.create_server(lambda: _UpstreamConn(self), "127.0.0.1", 0))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            server.close()
            loop.run_until_complete(server.wait_closed())
            loop.close()

        threading.Thread(target=run, daemon=True, name="recording-upstream").start()
        ready.wait(10)
        return self.port

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)


_NGINX_CONF = """
worker_processes 1;
master_process off;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream recording {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://recording;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $remote_addr;
        }}
    }}
}}
"""


class Nginx:
    """Debian's nginx as a plain reverse proxy (its defaults, HTTP/1.1 to the upstream), in a temp prefix."""

    def __init__(self, tmp: Path, upstream_port: int):
        from tests.conftest import free_port

        self.dir = tmp
        self.port = free_port()
        (tmp / "nginx.conf").write_text(_NGINX_CONF.format(dir=tmp, upstream=upstream_port, port=self.port))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        log = (self.dir / "stderr.log").open("ab")
        self.proc = subprocess.Popen([NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                      "-e", str(self.dir / "error.log")], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(self.dir / 'error.log').read_text(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return self
            time.sleep(0.05)
        raise RuntimeError("nginx did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass(frozen=True)
class Outcome:
    """What one run of an entry did: the requests the upstream received, the answers in order (their status,
    negative for an answer the front made itself rather than relayed from the upstream; ``0`` for bytes that
    are not an HTTP answer), and whether the connection was still open at the deadline."""

    forwarded: tuple[Any, ...]
    statuses: tuple[int, ...]
    hung: bool


class _Answers:
    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.parser = httptools.HttpResponseParser(self)
        self._body = b""

    def on_message_begin(self) -> None:
        self._body = b""

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.statuses.append(status if self._body == ANSWER else -status)

    def feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.statuses.append(0)
            self.parser = httptools.HttpResponseParser(self)


async def run(port: int, parts: list[bytes], source: str, upstream: Upstream, deadline: float = 3.0,
              settle: float = 0.0) -> Outcome:
    """Send ``parts`` (each one its own write, a moment apart), read the answers until the server closes.

    A front answers a forwarded request only after the upstream has recorded it; ``settle`` waits a moment
    more, for a front that might forward a request and close without waiting for its answer."""
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\0" * 8)
    sock.bind((source, 0))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    answers = _Answers()
    hung = False

    async def read() -> None:
        while data := await loop.sock_recv(sock, 65536):
            answers.feed(data)

    reader = asyncio.ensure_future(read())
    try:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0.001)
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, part)
        try:
            await asyncio.wait_for(asyncio.shield(reader), deadline)
        except TimeoutError:
            hung = True
        except OSError:
            pass
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        sock.close()
    if settle:
        await asyncio.sleep(settle)
    return Outcome(tuple(upstream.take(source)), tuple(answers.statuses), hung)


def sources(n: int) -> list[str]:
    """``n`` client addresses on the loopback network, one per parallel run."""
    base = 2 + os.getpid() % 200
    return [f"127.0.{base}.{i + 2}" for i in range(n)]
