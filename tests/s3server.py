"""An S3-compatible server on loopback for the tests: moto's ThreadedMotoServer (as s3fs's own tests use), behind
a small HTTP proxy that can misbehave on demand: answer errors, or drop connections, for the next N requests or
for every request to matching keys. Clients (s3fs, FFmpeg through presigned URLs) talk to the proxy."""

from __future__ import annotations

import http.client
import http.server
import socket
import socketserver
import threading
from dataclasses import dataclass

from moto.server import ThreadedMotoServer


@dataclass
class Fault:
    status: int | None  # an HTTP status to answer, or None to drop the connection without a response
    remaining: int | None  # requests left to spoil; None: every matching request
    match: str = ""  # spoil only requests whose path contains this
    method: str = ""  # and only requests of this method (GET, PUT, ...); empty: any
    spoiled: int = 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FlakyS3:
    def __init__(self) -> None:
        self.moto_port = _free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.requests = 0
        self.log: list[tuple[str, str, str]] = []  # (method, path with query, Range header) of every request
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def log_message(self, *args) -> None:
                pass

            def _relay(self) -> None:
                body = self._body()
                fault = proxy._take_fault(self.command, self.path, self.headers.get("Range") or "")
                if fault is not None and fault.status is None:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # dropped mid-request: no response at all
                    return
                if fault is not None:
                    payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
                               f"{'ServiceUnavailable' if fault.status >= 500 else 'AccessDenied'}</Code>"
                               f"<Message>injected</Message></Error>").encode()
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a body after a HEAD answer would be read as the next answer
                        self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.moto_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(key, value)
                # a HEAD answer has no body but declares the object's length
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            def _body(self) -> bytes | None:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    parts = []  # HTTP/1.1 chunked upload (botocore streams checksummed bodies this way)
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    del self.headers["Transfer-Encoding"]
                    body = b"".join(parts)
                    self.headers["Content-Length"] = str(len(body))
                    return body
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FlakyS3:
        self.moto.start()
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.moto.stop()

    def fail(self, count: int | None, status: int | None = 503, match: str = "", method: str = "") -> Fault:
        """Spoil the next `count` requests (every one when None) whose path contains `match` (of `method`)."""
        fault = Fault(status, count, match, method)
        with self.lock:
            self.faults.append(fault)
        return fault

    def heal(self) -> None:
        with self.lock:
            self.faults.clear()

    def _take_fault(self, method: str, path: str, byte_range: str) -> Fault | None:
        with self.lock:
            self.requests += 1
            self.log.append((method, path, byte_range))
            for fault in self.faults:
                if (fault.match in path and fault.method in ("", method)
                        and (fault.remaining is None or fault.remaining > 0)):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                    fault.spoiled += 1
                    return fault
        return None
