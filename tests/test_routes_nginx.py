"""nginx judges the Tempo tag-name escapes the matcher lets through: as a proxy in front of Tempo.

nginx, with ``proxy_pass`` naming a URI, forwards the *normalised* request URI: percent-decoded,
dot segments resolved, slashes merged, then escaped again (ngx_http_proxy_module). Every tag-values
path the matcher accepts, sent byte for byte through such an nginx to a second server block that echoes
the URI it received, must still name the tag-values route once Tempo's router decodes it.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest

from gateway.routes import match
from tests.conftest import free_port, require


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    require(exe is not None, "nginx")
    assert exe is not None
    d = tmp_path_factory.mktemp("nginx")
    front, echo = free_port(), free_port()
    (d / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
        f"events {{ worker_connections 64; }}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n"
        f"  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n"
        f"  server {{ listen 127.0.0.1:{front}; location / {{ proxy_pass http://127.0.0.1:{echo}/; }} }}\n"
        f"  server {{ listen 127.0.0.1:{echo}; location / {{ return 200 $request_uri; }} }}\n}}\n")
    proc = subprocess.Popen([exe, "-p", str(d), "-c", str(d / "nginx.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", front)) == 0:
                break
        time.sleep(0.05)
    try:
        yield front
    finally:
        proc.terminate()
        proc.wait(10)


def _through(port: int, path: str) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode("ascii"))
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode("latin-1")


def test_nginx_in_front_of_tempo_keeps_accepted_tag_names_on_the_tag_values_route(nginx: int) -> None:
    rng = random.Random(2929)
    alphabet = ["%", "2", "5", "F", "E", "e", "C", "0", "/", ".", "a", "%25", "%2F", "%2E", "%5C", "%252F", "%252E"]
    paths = ["/api/v2/search/tag/resource.k8s.io%252Fname/values", "/api/v2/search/tag/a%25percent%5Cb/values"]
    while len(paths) < 400:
        path = "/api/v2/search/tag/" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) + "/values"
        if match("GET", path) is not None:
            paths.append(path)
    forwarded = 0
    for path in paths:
        status, seen = _through(nginx, path)
        if status != 200:
            assert status == 400, (path, status)  # nginx refused it: not another route either
            continue
        forwarded += 1
        tempo = unquote(seen)  # Tempo's router matches the path decoded once
        assert tempo.startswith("/api/v2/search/tag/") and tempo.endswith("/values"), (path, seen)
        assert "/../" not in tempo and "/./" not in tempo, (path, seen)
    assert forwarded > 300
