"""The search server as a library: `open_server` loads a searcher and builds the FastAPI app
that ``python -m pipelines.serve`` runs (its docstring lists the endpoints); `Limits` bound
every request, and `WorkQueue` runs the model calls on a fixed pool of threads.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

WEB = Path(__file__).resolve().parent  # the page, its script and its style
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}  # every file the page loads
EXPLAIN_PAGE = 24  # results per page whose words and regions are computed (a grid's worth)
log = logging.getLogger("cpfean.serve")


@dataclass(frozen=True)
class Limits:
    max_query_chars: int = 500  # longer text is not a search query
    max_k: int = 100  # results per request
    max_upload_bytes: int = 10 << 20  # 10 MiB per uploaded image
    max_upload_pixels: int = 25_000_000  # checked from the header, before decoding
    workers: int = 1  # model calls at once (one saturates a small CPU)
    queue: int = 16  # requests waiting for a worker before 429


class Busy(Exception):
    """Every worker is busy and the queue is full."""


class DetectorUnavailable(Exception):
    """The detector for image uploads could not be built."""


class WorkQueue:
    """At most ``workers`` jobs run at once, on threads of their own; at most ``queue`` wait;
    more -> Busy.

    The model runs only on these long-lived threads (loading included, see `open_server`):
    torch's OpenMP team belongs to the thread that calls it, and two teams on a small CPU
    spin against each other, which made a query through the server twice as slow as the
    same query in one thread.
    """

    def __init__(self, workers: int, queue: int, threads: int = 0):
        self.executor = ThreadPoolExecutor(
            workers,
            thread_name_prefix="cpfean-model",
            initializer=(lambda: torch.set_num_threads(threads)) if threads else None,
        )
        self._slots = asyncio.Semaphore(workers)
        self._capacity, self._waiting = workers + queue, 0

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on a model thread and wait for it (outside the event loop)."""
        return self.executor.submit(fn).result()

    async def run(self, fn: Callable[[], Any]) -> Any:
        if self._waiting >= self._capacity:
            raise Busy
        self._waiting += 1
        try:
            async with self._slots:
                return await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        finally:
            self._waiting -= 1


def _thumbnail(path: str, size: int = 320) -> bytes:
    from PIL import Image

    from cpfean.images import decode_image

    image = Image.fromarray(decode_image(path))
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _body_too_large(request: Request, limits: Limits) -> JSONResponse | None:
    """413 (or 411) before a body is read: the multipart parser would otherwise spool any
    upload to disk before the handler could look at its size."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return None
    length = request.headers.get("content-length")
    if length is None:
        return JSONResponse({"error": "send a Content-Length with the upload"}, status_code=411)
    if not length.isdigit() or int(length) > limits.max_upload_bytes + (64 << 10):
        return JSONResponse(
            {"error": f"the upload is over {limits.max_upload_bytes} bytes"}, status_code=413
        )
    return None


@dataclass
class _Server:
    """What the routes share: the limits, the model threads, the live searcher, the upload
    detector (built on first use)."""

    limits: Limits
    work: WorkQueue
    live: Any
    detector_factory: Callable[[], Any] | None
    detector: dict[str, Any]

    def row_of(self, searcher: Any, image_id: str) -> int:
        try:
            return searcher.row_of(image_id)
        except KeyError:
            raise HTTPException(404, "no such image in the index") from None

    async def answer(self, fn: Callable[[], dict]) -> dict:
        """Run a search on a model thread; its results as the API shows them."""
        from cpfean.index import IndexFormatError
        from cpfean.search import QueryError

        try:
            payload = await self.work.run(fn)
        except Busy:
            raise HTTPException(429, "the server is busy; try again shortly") from None
        except (QueryError, IndexFormatError) as e:
            raise HTTPException(400, str(e)) from None
        payload["results"] = [_links(r) for r in payload["results"]]
        return payload

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.limits.max_k:
            raise HTTPException(400, f"k must be in 1..{self.limits.max_k}, got {k}")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _links(result: dict) -> dict:
    """A library result as the API shows it: no index row or file path (the server's own
    business), the image's URLs instead."""
    from urllib.parse import quote

    shown = {k: v for k, v in result.items() if k not in ("row", "path")}
    image_id = result.get("image_id")
    if image_id:
        shown["id"] = image_id
        shown["image_url"] = f"/images/{quote(image_id)}"
        shown["thumb_url"] = f"/thumbs/{quote(image_id)}"
    return shown


def create_app(
    searcher: Any,
    *,
    limits: Limits = Limits(),
    detector_factory: Callable[[], Any] | None = None,
    work: WorkQueue | None = None,
    reload_every: float = 1.0,
) -> Any:
    """The ASGI app over a loaded `cpfean.search.Searcher`.

    Args:
        detector_factory: builds the RegionExtractor for image uploads (called once, on the
            first upload); None refuses uploads with 501.
        reload_every: seconds between looks at the index folder for a rebuilt or updated
            index, loaded without a restart (`cpfean.search.LiveSearcher`); 0: never.
    """
    from cpfean.search import LiveSearcher

    app = FastAPI(title="cpfean", docs_url=None, redoc_url=None, openapi_url=None)
    work = work or WorkQueue(limits.workers, limits.queue)
    queue = work
    live = LiveSearcher(searcher, lambda fn: queue.executor.submit(fn), reload_every)
    server = _Server(limits, work, live, detector_factory, {})
    registry = _instrument(app, limits)
    _search_routes(app, server)
    _gallery_routes(app, server)
    _service_routes(app, server, registry)
    return app


def _instrument(app: Any, limits: Limits) -> CollectorRegistry:
    """Every response measured and counted; every error a JSON body, never a traceback."""
    registry = CollectorRegistry()
    requests = Counter(
        "cpfean_requests", "HTTP requests", ["endpoint", "status"], registry=registry
    )
    latency = Histogram(
        "cpfean_request_seconds",
        "request latency",
        ["endpoint"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )

    @app.middleware("http")
    async def measure(request: Request, call_next):
        start = time.perf_counter()
        route = request.url.path.split("/")[1] or "page"
        endpoint = (
            "/" + "/".join(request.url.path.split("/")[1:3]) if route == "api" else f"/{route}"
        )
        try:
            response = _body_too_large(request, limits) or await call_next(request)
        except Exception:  # reported as JSON, logged with its traceback here
            log.exception("unexpected error on %s", request.url.path)
            response = _error(500, "internal error")
        latency.labels(endpoint).observe(time.perf_counter() - start)
        requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return _error(422, f"{where}: {first.get('msg', 'invalid')}")

    return registry


def _search_routes(app: Any, server: _Server) -> None:
    """Text queries, image uploads, "more like this"."""
    from cpfean.images import BadImage, decode_image_bytes

    limits = server.limits

    @app.get("/api/search")
    async def search_text(q: str = "", k: int = 10, label: str = "", under: str = ""):
        server.check_k(k)
        if not q.strip():
            raise HTTPException(400, "the query is empty; pass q=some+words")
        if len(q) > limits.max_query_chars:
            raise HTTPException(
                400, f"the query is {len(q)} characters; at most {limits.max_query_chars}"
            )
        filters = {name: v for name, v in (("label", label), ("under", under)) if v.strip()}
        for name, value in filters.items():
            if len(value) > limits.max_query_chars:
                raise HTTPException(
                    400, f"{name} is {len(value)} characters; at most {limits.max_query_chars}"
                )
        searcher = server.live.current  # one index for the whole request, even if another arrives
        return await server.answer(
            lambda: searcher.text_to_images(q, k, explain=min(k, EXPLAIN_PAGE), **filters)
        )

    @app.post("/api/search")
    async def search_image(image: Annotated[UploadFile, File()], k: int = 10):
        server.check_k(k)
        if server.detector_factory is None:
            raise HTTPException(501, "image queries are off on this server (no detector)")
        data = await image.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise HTTPException(413, f"the upload is over {limits.max_upload_bytes} bytes")
        try:
            bgr = decode_image_bytes(data, limits.max_upload_pixels)[:, :, ::-1].copy()
        except BadImage as e:
            raise HTTPException(400, f"cannot use the upload: {e}") from None
        searcher = server.live.current

        def run() -> dict:
            if "extractor" not in server.detector:
                try:
                    server.detector["extractor"] = server.detector_factory()
                except Exception as e:  # the reason goes to the client
                    raise DetectorUnavailable(str(e)) from None
            record = server.detector["extractor"].extract_one(bgr)
            return searcher.image_to_captions(record, k, query=image.filename or "upload")

        try:
            return await server.answer(run)
        except DetectorUnavailable as e:
            raise HTTPException(503, f"image queries are not available: {e}") from None

    @app.get("/api/similar/{image_id:path}")
    async def similar(image_id: str, k: int = 10):
        server.check_k(k)
        searcher = server.live.current
        server.row_of(searcher, image_id)
        return await server.answer(lambda: searcher.similar_images(image_id, k))


def _gallery_routes(app: Any, server: _Server) -> None:
    """A gallery image's facts, file and thumbnail, looked up by id in the index."""
    thumbs = functools.lru_cache(maxsize=4096)(_thumbnail)

    @app.get("/api/image/{image_id:path}")
    async def image_info(image_id: str):
        searcher = server.live.current
        row = server.row_of(searcher, image_id)
        return {
            "id": image_id,
            "hw": [int(x) for x in searcher.index.hw[row]],
            "captions": searcher.captions_of(image_id),
            "image_url": _links({"image_id": image_id})["image_url"],
        }

    @app.get("/images/{image_id:path}")
    async def full_image(image_id: str):
        searcher = server.live.current
        path = Path(searcher.index.image_path(server.row_of(searcher, image_id)))
        if not path.is_file():
            raise HTTPException(404, "the image file is not on this server")
        return FileResponse(path)

    @app.get("/thumbs/{image_id:path}")
    async def thumbnail(image_id: str):
        searcher = server.live.current
        path = searcher.index.image_path(server.row_of(searcher, image_id))
        try:
            data = await server.work.run(lambda: thumbs(path))
        except Busy:
            raise HTTPException(429, "the server is busy; try again shortly") from None
        except Exception:  # a missing or unreadable file is the same to a user
            raise HTTPException(404, "the image file is not readable on this server") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _service_routes(app: Any, server: _Server, registry: CollectorRegistry) -> None:
    """Health, metrics, the page and its static files."""

    @app.get("/healthz")
    async def healthz():
        index = server.live.current.index
        return {
            "status": "ok",
            "images": index.count,
            "captions": len(index.captions),
            "generation": index.meta.get("generation"),
        }

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def page():
        return HTMLResponse((WEB / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC:
            raise HTTPException(404, "not found")
        return Response((WEB / name).read_bytes(), media_type=STATIC[name])


def open_server(
    open_searcher: Callable[[], Any],
    *,
    limits: Limits = Limits(),
    threads: int = 0,
    detector_factory: Callable[[Any], Any] | None = None,
    reload_every: float = 1.0,
) -> tuple[Any, Any]:
    """Load a searcher on the model threads, warm it up there, and build the app.

    Args:
        open_searcher: loads the searcher (called on a model thread).
        detector_factory: given the searcher, builds the upload detector (None: no uploads).
    Returns:
        (app, searcher).
    """
    work = WorkQueue(limits.workers, limits.queue, threads)
    searcher = work.call(open_searcher)
    work.call(lambda: searcher.text_to_images("warm up", 1))  # lazy set-up before any user
    factory = functools.partial(detector_factory, searcher) if detector_factory else None
    app = create_app(
        searcher, limits=limits, detector_factory=factory, work=work, reload_every=reload_every
    )
    return app, searcher
