"""HTTP JSON front end (stdlib `ThreadingHTTPServer`: one thread per connection; the engine work
itself is serialised by the service's engine loop).

  POST /v1/recommend              {"user_id", "history"?, "candidates", "top_k"?}
  POST /v1/users/{id}/events      {"items": [item ids]}
  GET  /v1/items/{id}
  GET  /healthz
  GET  /metrics                   Prometheus text
"""

from __future__ import annotations

import json
import re
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rcllm_jax.serve.service import ApiError, RecommenderService

MAX_BODY = 64 * 1024


def make_server(service: RecommenderService, host: str = "127.0.0.1", port: int = 8000,
                max_body: int = MAX_BODY) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: a drain never waits on idle keep-alives
        server_version = "rcllm-jax"

        def log_message(self, fmt, *args):  # access log off (metrics count requests)
            pass

        def _send(self, status: int, body, content_type="application/json", headers=None):
            data = (json.dumps(body) if content_type == "application/json" else body).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: ApiError):
            service.metrics.inc(f"http_{e.status}_total")
            self._send(e.status, {"error": e.message, "status": e.status}, headers=e.headers)

        def _body(self):
            length = self.headers.get("Content-Length")
            if length is None:
                raise ApiError(411, "Content-Length required")
            try:
                n = int(length)
            except ValueError:
                raise ApiError(400, f"bad Content-Length {length!r}") from None
            if n > max_body:
                self.close_connection = True
                raise ApiError(413, f"body of {n} bytes exceeds the limit of {max_body}")
            raw = self.rfile.read(n)
            try:
                return json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ApiError(400, f"malformed JSON: {e}") from None

        def _dispatch(self, method: str):
            path = self.path.split("?", 1)[0]
            try:
                if method == "POST" and path == "/v1/recommend":
                    return self._send(200, service.recommend(self._body()))
                m = re.fullmatch(r"/v1/users/([^/]+)/events", path)
                if method == "POST" and m:
                    return self._send(200, service.add_events(m.group(1), self._body()))
                m = re.fullmatch(r"/v1/items/([^/]+)", path)
                if method == "GET" and m:
                    return self._send(200, service.item(m.group(1)))
                if method == "GET" and path == "/healthz":
                    h = service.health()
                    return self._send(200 if h["status"] == "ok" else 503, h)
                if method == "GET" and path == "/metrics":
                    return self._send(200, service.metrics_text(), "text/plain; version=0.0.4")
                raise ApiError(404 if path not in ("/v1/recommend", "/healthz", "/metrics") else 405,
                               f"no route for {method} {path}")
            except ApiError as e:
                self._error(e)
            except Exception as e:  # noqa: BLE001 - never let a handler bug take the server down
                rid = uuid.uuid4().hex[:12]
                self._error(ApiError(500, f"internal error {rid}: {type(e).__name__}: {e}"))

        def do_GET(self):
            self._dispatch("GET")

        def do_POST(self):
            self._dispatch("POST")

    class Server(ThreadingHTTPServer):
        daemon_threads = False  # server_close() waits for in-flight handlers (drain on SIGTERM)
        allow_reuse_address = True

    return Server((host, port), Handler)
