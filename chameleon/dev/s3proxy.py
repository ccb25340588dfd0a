"""A loopback HTTP proxy in front of a local S3 server that drops chosen request headers, and
records every request it forwards (or answers with an injected error, `fail_next`): a real store that ignores `If-None-Match`, for the tests and
the integrity benchmark, and a witness of what the client really sent (each multipart part's
checksum header).

    with LocalS3Server(backend="moto") as s3, S3Proxy(s3.endpoint_url, drop={"if-none-match"}) as proxy:
        store = S3Store("b", "p", create_bucket=True, **{**s3.storage_options(), "endpoint_url": proxy.url})

Dropping a signed header breaks a SigV4 signature, so put it in front of moto (which does not
check signatures), not SeaweedFS. Listens on 127.0.0.1 only; forwards only to a loopback upstream.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

LOOPBACK = "127.0.0.1"
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass(frozen=True)
class Forwarded:
    method: str
    path: str
    """Path and query, e.g. `/bucket/key?partNumber=1&uploadId=…`."""
    headers: dict[str, str]
    """Request headers as the client sent them (lowercase names), dropped ones included."""
    status: int


class S3Proxy:
    """Forward requests to `upstream` (a loopback `http://127.0.0.1:PORT`), without the headers
    named in `drop` (lowercase); `requests` lists what was forwarded."""

    def __init__(self, upstream: str, *, drop: set[str] | frozenset[str] = frozenset()) -> None:
        parsed = urlparse(upstream)
        if parsed.scheme != "http" or parsed.hostname not in (LOOPBACK, "localhost"):
            raise ValueError(f"the proxy forwards to a loopback http:// server only, not {upstream!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.drop = {h.lower() for h in drop}
        self.requests: list[Forwarded] = []
        self._errors: list[tuple[str, int, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the proxy is not running"
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    def start(self) -> S3Proxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                sent = {k.lower(): v for k, v in self.headers.items()}
                if proxy._answer_error(self, sent):
                    return
                headers = {k: v for k, v in sent.items() if k not in _HOP_BY_HOP and k not in proxy.drop}
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.requests.append(Forwarded(self.command, self.path, sent, resp.status))

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> S3Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, method: str, status: int, code: str, times: int = 1) -> None:
        """Answer the next `times` requests of `method` with an S3 error (not forwarded)."""
        with self._lock:
            self._errors += [(method, status, code)] * times

    def _answer_error(self, handler: BaseHTTPRequestHandler, sent: dict[str, str]) -> bool:
        with self._lock:
            match = next((e for e in self._errors if e[0] == handler.command), None)
            if match is None:
                return False
            self._errors.remove(match)
            self.requests.append(Forwarded(handler.command, handler.path, sent, match[1]))
        body = f"<Error><Code>{match[2]}</Code><Message>injected by S3Proxy</Message></Error>".encode()
        handler.send_response(match[1])
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        return True

    def upload_parts(self) -> list[Forwarded]:
        """The multipart part uploads forwarded (`PUT …?partNumber=N&uploadId=…`)."""
        with self._lock:
            return [r for r in self.requests if r.method == "PUT" and "partNumber=" in r.path]
