"""HTTP front end: FastAPI routes with pydantic request models (the OpenAPI schema at `/docs` and
`/openapi.json`), served by uvicorn (`serve_http`). Handlers only validate, enqueue and read the
state database; the service's engine loop owns every cache.

  POST /v1/recommend              {"user_id", "history"?, "candidates"?, "num_candidates"?, "top_k"?}
  POST /v1/recommend/batch        {"requests": [recommend bodies]}: one answer per request, in order
  POST /v1/users/{id}/events      {"items": [item ids], "event_id"?}: appended, answered after commit
  PUT  /v1/users/{id}/history     {"items": [item ids]}: the stored history replaced
  GET  /v1/users/{id}             {"user_id", "history", "version"}
  GET  /v1/items/{id}
  GET  /healthz
  GET  /metrics                   Prometheus text (prometheus_client)

User ids are opaque strings (1..128 printable characters): "007" and "7" are two users; a JSON
integer id is its decimal string (MovieLens ids are digit strings, so 1 and "1" are one user).
A recommend request's `history` is used for that request only: stored histories change through
events and PUT history alone. Every client error is a 4xx with {"error": message, "status": code};
503s carry Retry-After and mean the request was not applied.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from typing import Annotated, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from rcllm_jax.serve.service import ApiError, RecommenderService

MAX_BODY = 64 * 1024
TOO_MANY_DIGITS = "a JSON number has more digits than any field takes (ids: at most 128 digits)"  # Python's int-string limit (4300 digits)
UserId = Union[StrictInt, Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^\S+$")]]
ItemIds = list[StrictInt | StrictStr]  # as the catalog names its items


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: UserId
    history: ItemIds | None = Field(None, description="The history to rank with, for this request only (the "
                                    "stored one is not changed); absent: the user's stored history.")
    candidates: ItemIds | None = Field(None, description="Items to rank; absent: the retriever proposes them.")
    num_candidates: StrictInt | None = Field(None, description="How many the retriever proposes.")
    top_k: StrictInt | None = Field(None, description="Items in the answer (default: all candidates).")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[RecommendRequest] = Field(..., min_length=1, max_length=64)


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: ItemIds
    event_id: Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$")] | None = Field(
        None, description="Client id of this event: a retry with the same id is applied once and answered the "
                          "same (with replay: true).")


class HistoryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: ItemIds


class RankedItem(BaseModel):
    item_id: int | str
    score: float
    title: str


class RecommendResponse(BaseModel):
    user_id: UserId
    request_id: str
    ranking: list[RankedItem]
    shard: int
    mode: str
    retrieved: bool
    timings: dict[str, float]
    cache: dict[str, int]


def _message(err: dict) -> str:
    where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = str(err.get('ctx', {}).get('error', err.get('msg')))
        if "digits" in detail:  # Python's int-string limit (4300 digits) hit while parsing
            return TOO_MANY_DIGITS
        return f"malformed JSON: {detail}"
    if kind == "extra_forbidden":
        return f"unknown field {where!r}"
    if kind == "missing":
        return f"{where} is required"
    if kind.startswith("int"):
        return f"{where} must be an integer, got {err.get('input')!r}"
    return f"{where or 'body'}: {err.get('msg')}"


def make_app(service: RecommenderService, max_body: int = MAX_BODY, body_timeout_s: float = 10.0) -> FastAPI:
    """The HTTP API over a service: its error answers, the request-body checks, the routes."""
    app = FastAPI(title="rcllm-jax", summary="Ranked recommendations: retrieve, then rerank over cached KV blocks.")
    _error_handlers(app, service)
    _body_checks(app, service, max_body, body_timeout_s)
    _routes(app, service)
    return app


def _answer(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body, status, headers=headers)


def _error_handlers(app: FastAPI, service: RecommenderService):
    """Every error as {"error", "status"}: the service's, validation (400), routing and parsing, a
    handler bug (500 with an id, the server keeps serving)."""
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _answer(e.status, {"error": e.message, "status": e.status}, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errs = e.errors()
        return _answer(400, {"error": "; ".join(_message(x) for x in errs[:5]), "status": 400})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):  # no route (404/405), an unparsable body (400)
        detail = str(e.detail)
        msg = (f"no route for {request.method} {request.url.path}" if e.status_code in (404, 405)
               else f"malformed JSON: {detail}" if e.status_code == 400 else detail)  # (digits: the middleware's)
        return _answer(e.status_code, {"error": msg, "status": e.status_code}, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):  # a handler bug: 500 with an id, the server keeps serving
        rid = uuid.uuid4().hex[:12]
        service.metrics.responses.labels("500").inc()  # outside the middleware that counts the others
        return _answer(500, {"error": f"internal error {rid}: {type(e).__name__}", "status": 500})


def _body_checks(app: FastAPI, service: RecommenderService, max_body: int, body_timeout_s: float):
    """The middleware that reads and checks every POST / PUT body, and counts every answer."""
    @app.middleware("http")
    async def checked_body(request: Request, call_next):
        """A POST body is read here, whole and in time: 411 without a Content-Length (chunked
        bodies are refused), 400 for one that is not a length, 413 over the limit (before reading),
        408 when it does not arrive within `body_timeout_s`. Bodies are JSON whatever the client's
        Content-Type says (curl -d sends a form type)."""
        def refuse(status: int, message: str, headers: dict | None = None) -> JSONResponse:
            service.metrics.responses.labels(str(status)).inc()  # answered here, before the counting below
            return _answer(status, {"error": message, "status": status}, headers)

        if request.method in ("POST", "PUT"):
            length = request.headers.get("content-length")
            if length is None:
                return refuse(411, "Content-Length required")
            if not (length.isascii() and length.isdigit()) or len(length) > 18:
                return refuse(400, f"bad Content-Length {length[:40]!r}")
            if int(length) > max_body:
                return refuse(413, f"body of {int(length)} bytes exceeds the limit of {max_body}",
                              {"Connection": "close"})
            try:
                body = await asyncio.wait_for(request.body(), body_timeout_s)
            except asyncio.TimeoutError:
                return refuse(408, f"request body not received within {body_timeout_s:g}s", {"Connection": "close"})
            try:  # Python's int-string limit (4300 digits): FastAPI would call it a generic parse error
                json.loads(body or b"null")
            except (ValueError, RecursionError) as e:  # the rest is FastAPI's to answer
                if isinstance(e, ValueError) and "digits" in str(e) and not isinstance(e, json.JSONDecodeError):
                    return refuse(400, TOO_MANY_DIGITS)
            request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"] + \
                [(b"content-type", b"application/json")]
        response = await call_next(request)
        service.metrics.responses.labels(str(response.status_code)).inc()
        return response


def _routes(app: FastAPI, service: RecommenderService):
    """The API's routes, each a call of the service (blocking ones in a worker thread)."""
    async def run(request: Request, fn, *args):
        """Run a blocking service call in a worker thread; the client going away cancels it
        (a queued request is then dropped, not computed)."""
        gone = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(fn, *args, gone.is_set))
        while not work.done():
            await asyncio.wait({work}, timeout=0.2)
            if not work.done() and await request.is_disconnected():
                gone.set()
        return work.result()

    @app.post("/v1/recommend", response_model=RecommendResponse)
    async def recommend(body: RecommendRequest, request: Request):
        return await run(request, service.recommend, body.model_dump(exclude_none=True))

    @app.post("/v1/recommend/batch")
    async def recommend_batch(body: BatchRequest, request: Request):
        """Rank for many users at once: the requests are queued together (the scheduler groups them
        by shard); each answer is a recommendation or {"error", "status"}."""
        return {"results": await run(request, service.recommend_many,
                                     [r.model_dump(exclude_none=True) for r in body.requests])}

    @app.post("/v1/users/{user_id}/events")
    async def events(user_id: str, body: EventsRequest, request: Request):
        return await run(request, service.add_events, user_id, body.model_dump(exclude_none=True))

    @app.put("/v1/users/{user_id}/history")
    async def put_history(user_id: str, body: HistoryRequest, request: Request):
        return await run(request, service.put_history, user_id, body.model_dump())

    @app.get("/v1/users/{user_id}")
    def user(user_id: str):
        return service.user(user_id)

    @app.get("/v1/items/{item_id}")
    def item(item_id: str):
        return service.item(item_id)

    @app.post("/admin/reload")
    async def reload(request: Request):
        """Take the newest snapshot step and the catalog as it is now (after launch/build_cache.py
        --update), without a restart: staged beside what is served, swapped in between requests."""
        return await run(request, service.reload)

    @app.get("/healthz")
    def health():
        h = service.health()
        return JSONResponse(h, 200 if h["status"] == "ok" else 503)

    @app.get("/metrics")
    def metrics():
        return Response(service.metrics_text(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _guarded_h11(head_timeout_s: float, max_connections: int, per_client: int, retry_after_s: int, count):
    """uvicorn's h11 protocol with what uvicorn alone lacks: a deadline on every request head (a
    connection that has not sent a complete request line and headers within `head_timeout_s` of
    connecting, or of its previous response, is closed: uvicorn times out only idle keep-alive
    connections); a cap on open connections in all and per client address (beyond either: a JSON
    503 with Retry-After, then close, so idle sockets of one client cannot starve the others);
    count(status) for the answers uvicorn writes itself (400 for an unparsable request, these 503s),
    so /metrics counts every response."""
    import collections
    import json

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    open_by_host = collections.Counter()
    busy = json.dumps({"error": "too many open connections (from this client or in all): retry later",
                       "status": 503}).encode()

    class GuardedH11(H11Protocol):
        def _arm(self):
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_late)

        def _head_late(self):
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._host = (self.client or ("?",))[0]
            open_by_host[self._host] += 1
            self._arm()
            if len(self.connections) > max_connections or open_by_host[self._host] > per_client:
                count(503)
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                b"retry-after: %d\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                                % (retry_after_s, len(busy), busy))
                transport.close()

        def send_400_response(self, msg: str):
            count(400)
            super().send_400_response(msg)

        def on_response_complete(self):
            super().on_response_complete()
            self._head_timer.cancel()
            self._arm()

        def connection_lost(self, exc):
            self._head_timer.cancel()
            open_by_host[self._host] -= 1
            if not open_by_host[self._host]:
                del open_by_host[self._host]
            super().connection_lost(exc)

    return GuardedH11


class HttpServer:
    """uvicorn in a background thread (the main thread keeps the signals): a real listen backlog,
    keep-alive, deadlines on request heads (here) and bodies (`make_app`), caps on connections in all
    and per client (beyond: 503 + Retry-After); `close` stops accepting and gives open connections at most
    `grace_s` before closing them, whatever the clients do."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, backlog: int = 2048,
                 max_connections: int = 1024, max_client_connections: int = 256, keep_alive_s: float = 5.0,
                 grace_s: float = 5.0, head_timeout_s: float = 10.0, retry_after_s: int = 1, count=lambda status: None):
        import socket

        import uvicorn
        self.sock = socket.create_server((host, port), backlog=backlog, reuse_port=False)
        http = _guarded_h11(head_timeout_s, max_connections, max_client_connections, retry_after_s, count)
        self.config = uvicorn.Config(app, http=http, log_level="warning", access_log=False,
                                     backlog=backlog, timeout_keep_alive=keep_alive_s,
                                     timeout_graceful_shutdown=grace_s, lifespan="off", server_header=False)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve(max_connections)), name="http",
                                       daemon=True)
        self.grace_s = grace_s

    async def _serve(self, workers: int):
        # Handlers wait for the engine in worker threads: one per open request (asyncio's default
        # pool has cpu + 4, which would queue requests out of sight of the scheduler's bound).
        from concurrent.futures import ThreadPoolExecutor
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(workers, thread_name_prefix="http-wait"))
        await self.server.serve([self.sock])

    @property
    def address(self) -> tuple[str, int]:
        return self.sock.getsockname()[:2]

    def start(self):
        self.thread.start()

    def close(self):
        self.server.should_exit = True
        self.thread.join(self.grace_s + 5.0)
