"""The HTTP gateway: birdgen's REST API and web page over the asyncio client, async end to end.

`create_app(settings)` builds it; `birdgen gateway` serves it with uvicorn. Everything a replica
shares with the others lives in Redis (rate limits, batch jobs, the response cache), so any number
of replicas can sit behind one load balancer. docs/gateway.md has the API with curl examples.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import redis.asyncio
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import birdgen
from birdgen.catalogue import Catalogue
from birdgen.client import (
    AsyncBirdClient,
    BirdgenError,
    DeadlineExceededError,
    GeneratedAnimation,
    GeneratedImage,
    InvalidRequestError,
    ResponseCache,
    ServerOverloadedError,
    ServerUnavailableError,
)
from birdgen.contracts import ANIMATION_MODEL, GIF, IMAGE_MODEL, POSTER, WEBP
from birdgen.eink_panels import PRESETS as EINK_PANELS
from birdgen.gateway.bodies import animation_request, batch_image_request, body_schema, image_request
from birdgen.gateway.jobs import BatchJobs, valid_job_id
from birdgen.gateway.metrics import gateway_metrics
from birdgen.gateway.rate_limit import RateLimiter
from birdgen.gateway.settings import GatewaySettings
from birdgen.prompts import FIELDS, PromptLibrary
from birdgen.request_error import RequestError
from birdgen.schema import ANIMATION, EINK, LIMITS, AnimationRequest, ImageRequest

STATIC = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
NDJSON = "application/x-ndjson"
# The e-ink endpoint's query parameters, by the request field each one sets.
EINK_QUERY = {"eink_panel": "panel", "eink_palette": "palette", "eink_dither": "dither", "eink_fit": "fit"}
RETRY_AFTER_UNAVAILABLE_S = 5
ENTRY_MODELS = (IMAGE_MODEL, ANIMATION_MODEL)  # what /health reports
# The routes whose bodies may carry a client picture, each with its own, larger body bound: control
# images (max_image_body_bytes) and an svd animation's image (max_animation_body_bytes).
IMAGE_ROUTE = "/api/v1/generate/image"
ANIMATION_ROUTE = "/api/v1/generate/gif"


def error_status(exc: BirdgenError) -> int:
    """The HTTP status of a client error: the caller's fault is 4xx, the service's 5xx."""
    if isinstance(exc, InvalidRequestError):
        return 422
    if isinstance(exc, ServerUnavailableError):
        return 503
    if isinstance(exc, DeadlineExceededError):
        return 504
    return 502  # GenerationError: Triton took the request and failed it


def invalid(
    exc: RequestError, *prefix: str | int, where: str = "body", field: str | None = None
) -> JSONResponse:
    """422 in FastAPI's own shape, naming the field, what it got and what is allowed."""
    value = exc.value if isinstance(exc.value, str | int | float | bool) else None
    if isinstance(value, float) and not math.isfinite(value):
        value = None  # a NaN or Infinity literal in the body: standard JSON has no way to write it back
    detail = {
        "loc": [where, *prefix, _utf8(field or exc.field)],
        "msg": _utf8(str(exc)),
        "type": "value_error",
        "input": _utf8(value) if isinstance(value, str) else value,
        "allowed": _utf8(exc.allowed),
    }
    return JSONResponse({"detail": [detail]}, status_code=422)


def _utf8(text: str) -> str:
    """`text` as a UTF-8 body can carry it: a lone surrogate (JSON's "\\ud800") becomes its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def retry_after_s(exc: BirdgenError) -> int | None:
    """The Retry-After of a 503, in whole seconds: an overloaded server's is the client's own next
    backoff cap (RetryPolicy.cap: 2 s by default once its retries are spent), so HTTP callers come
    back no sooner than the client itself would have; an unreachable one's is a fixed 5 s."""
    if isinstance(exc, ServerOverloadedError):
        return max(1, math.ceil(exc.retry_after_s))
    return RETRY_AFTER_UNAVAILABLE_S if isinstance(exc, ServerUnavailableError) else None


def _failure(exc: BirdgenError) -> JSONResponse:
    retry_after = retry_after_s(exc)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"detail": str(exc), "type": type(exc).__name__}
    return JSONResponse(body, status_code=error_status(exc), headers=headers)


def _wants(request: Request, media_type: str) -> bool:
    return media_type in request.headers.get("accept", "")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _provenance(metadata: dict[str, Any]) -> dict[str, str]:
    """Headers saying what made a raw file (also embedded in it): the AI label first."""
    headers = {"X-AI-Generated": "true"}
    for header, key in (("Seed", "seed"), ("Model-Version", "model_version"), ("Family", "family")):
        if metadata.get(key) is not None:
            headers[f"X-Birdgen-{header}"] = str(metadata[key])
    return headers


class BodyLimit:
    """413 for a body over `limit` bytes, whether announced (Content-Length) or streamed (chunked);
    a path in `routes` has its own limit instead (the single image and animation requests, which may
    carry pictures)."""

    def __init__(self, app: ASGIApp, limit: int, routes: Mapping[str, int] | None = None) -> None:
        self.app, self.limit, self.routes = app, limit, dict(routes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.routes.get(scope["path"], self.limit)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._refuse(send, limit)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send, limit)

    async def _refuse(self, send: Send, limit: int) -> None:
        body = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def _request_options(catalogue: Catalogue) -> dict[str, Any]:
    """GET /api/v1/options: built once per app, as every part of it is fixed at load."""
    vocabulary = PromptLibrary.load()
    return {
        "species": [
            {
                "species_id": s.species_id,
                "common_name": s.common_name,
                "scientific_name": s.scientific_name,
                "family": s.family,
            }
            for s in sorted(catalogue.species, key=lambda s: s.common_name)
        ],
        "vocabulary": {field: list(vocabulary.allowed(field)) for field in FIELDS},
        "image": {"formats": list(LIMITS.formats), "width": LIMITS.width.model_dump()},
        "animation": {
            "formats": list(ANIMATION.formats),
            "width": ANIMATION.width.model_dump(),
            "fps": ANIMATION.fps.model_dump(),
            "duration_seconds": ANIMATION.duration_seconds.model_dump(),
        },
        "eink_panels": list(EINK_PANELS.panels),
    }


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings.from_env()
    metrics = gateway_metrics()
    catalogue = Catalogue.load()
    request_options = _request_options(catalogue)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        store = redis.asyncio.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        cache = ResponseCache(settings.redis_url, registry=metrics.registry, socket_timeout_s=1.0)
        client = AsyncBirdClient(settings.triton_url, deadline_s=settings.deadline_s, cache=cache)

        async def generate(request: ImageRequest) -> GeneratedImage:
            return await client.generate_image(request)

        jobs = BatchJobs(
            store,
            generate,
            error_status,
            ttl_s=settings.job_ttl_s,
            lease_s=settings.job_lease_s,
            on_item=lambda outcome: metrics.batch_items.labels(outcome).inc(),
        )
        metrics.batch_jobs_running.set_function(lambda: len(jobs.running))
        state.update(
            redis=store, client=client, jobs=jobs, limiter=RateLimiter(store, settings.rate_limit_per_minute)
        )
        scan = asyncio.create_task(jobs.scan_forever(settings.job_lease_s / 3))
        try:
            yield
        finally:
            scan.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scan
            await jobs.close()
            await client.close()
            await cache.aclose()
            await store.aclose()

    app = FastAPI(
        title="birdgen",
        version=birdgen.__version__,
        summary="AI-generated bird images, animations and e-ink bitmaps for ChirpNeighbors",
        lifespan=lifespan,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Accept", "X-API-Key"],
            expose_headers=["Retry-After", "X-AI-Generated", "X-Birdgen-Seed", "X-Birdgen-Model-Version"],
        )
    app.add_middleware(
        BodyLimit,
        limit=settings.max_body_bytes,
        routes={
            IMAGE_ROUTE: settings.max_image_body_bytes,
            ANIMATION_ROUTE: settings.max_animation_body_bytes,
        },
    )

    @app.middleware("http")
    async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - start)
        return response

    async def limit(request: Request) -> None:
        """The rate limit, per API key or else per client IP; raises 401 / 429."""
        key = request.headers.get("x-api-key")
        if key is not None and settings.api_keys and key not in settings.api_keys:
            raise HTTPException(401, "unknown X-API-Key")
        # A key is a secret: Redis sees only its hash.
        client_ip = request.client.host if request.client else "unknown"
        identity = f"key:{hashlib.sha256(key.encode()).hexdigest()[:32]}" if key else f"ip:{client_ip}"
        decision = await state["limiter"].check(identity)
        if not decision.allowed:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.rate_limited.labels(route).inc()
            raise HTTPException(
                429,
                f"rate limit: {settings.rate_limit_per_minute} requests a minute",
                headers={"Retry-After": str(decision.retry_after_s)},
            )

    async def body(request: Request) -> Any:
        try:
            return await request.json()
        except (ValueError, RecursionError):  # also a number past int()'s digit limit, deep nesting
            raise RequestError("request", "(not JSON)", "a JSON object of request fields") from None

    # -- pages and service endpoints ------------------------------------------------------------------
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 when Triton's entry model and Redis answer, else 503 saying which does not."""
        triton: dict[str, Any] = {"url": settings.triton_url, "ready": False}
        try:
            client: AsyncBirdClient = state["client"]
            versions = {name: await client.served_versions(name, deadline_s=5) for name in ENTRY_MODELS}
            triton["models"] = {name: max(v, key=int) for name, v in versions.items() if v}
            triton["ready"] = IMAGE_MODEL in triton["models"]
        except BirdgenError as exc:
            triton["error"] = str(exc)
        try:
            redis_ok = bool(await state["redis"].ping())
        except (redis.RedisError, OSError):
            redis_ok = False
        ok = triton["ready"] and redis_ok
        body = {"status": "ok" if ok else "unavailable", "triton": triton, "redis": {"reachable": redis_ok}}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/v1/options")
    async def options() -> dict[str, Any]:
        """What a request may ask for: species, vocabulary, sizes, formats and e-ink panels (the web page)."""
        return request_options

    # -- generation -----------------------------------------------------------------------------------
    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return invalid(exc)

    @app.exception_handler(BirdgenError)
    async def birdgen_error(_: Request, exc: BirdgenError) -> JSONResponse:
        return _failure(exc)

    @app.exception_handler(redis.RedisError)
    async def redis_error(_: Request, exc: redis.RedisError) -> JSONResponse:
        """Batch jobs live in Redis, so while it does not answer none is taken or reported: 503
        saying so, not a bare 500 (generation goes on: the rate limit and the cache fail open)."""
        return JSONResponse(
            {"detail": f"Redis is unavailable, batch jobs need it: {exc}", "type": type(exc).__name__},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)},
        )

    def image_response(request: Request, image: GeneratedImage) -> Response:
        if _wants(request, "application/json"):
            return JSONResponse(
                {
                    "metadata": image.metadata,
                    "content_type": MEDIA_TYPES[image.format],
                    "data": _b64(image.data),
                }
            )
        return Response(image.data, media_type=MEDIA_TYPES[image.format], headers=_provenance(image.metadata))

    @app.post(IMAGE_ROUTE, openapi_extra=body_schema(ImageRequest))
    async def generate_image(request: Request) -> Response:
        """One image. Raw bytes (Content-Type by `format`), or JSON with `Accept: application/json`."""
        await limit(request)
        parsed = image_request(await body(request))
        if parsed.format == EINK:
            raise RequestError(
                "format", EINK, "png, webp or jpeg here; e-ink bitmaps: GET /api/v1/eink/{species_id}"
            )
        return image_response(request, await state["client"].generate_image(parsed))

    def animation_json(clip: GeneratedAnimation) -> dict[str, Any]:
        files = {
            name: {"content_type": MEDIA_TYPES["png" if name == POSTER else name], "data": _b64(data)}
            for name, data in clip.files.items()
        }
        return {"metadata": clip.metadata, "files": files}

    @app.post(ANIMATION_ROUTE, openapi_extra=body_schema(AnimationRequest))
    async def generate_animation(request: Request) -> Response:
        """One animation: animated WebP or GIF by `format` or by `Accept` (image/webp, image/gif);
        JSON with every file (`Accept: application/json`), or progress lines then the result
        (`Accept: application/x-ndjson`). With `"engine": "svd"` the body may carry the picture to
        animate, base64 (`image`), hence this route's own body bound (max_animation_body_bytes)."""
        await limit(request)
        defaults = (
            {"format": GIF} if _wants(request, "image/gif") and not _wants(request, "image/webp") else {}
        )
        parsed = animation_request(await body(request), **defaults)
        client: AsyncBirdClient = state["client"]
        if _wants(request, NDJSON):
            return StreamingResponse(_stream(client, parsed), media_type=NDJSON)
        clip = await client.generate_animation(parsed)
        if _wants(request, "application/json"):
            return JSONResponse(animation_json(clip))
        main = WEBP if WEBP in clip.files else GIF
        return Response(clip.files[main], media_type=MEDIA_TYPES[main], headers=_provenance(clip.metadata))

    async def _stream(client: AsyncBirdClient, parsed: AnimationRequest) -> AsyncIterator[bytes]:
        lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def run() -> None:
            try:
                clip = await client.generate_animation(
                    parsed, on_progress=lambda p: lines.put_nowait({"type": "progress", **p})
                )
                lines.put_nowait({"type": "result", **animation_json(clip)})
            except BirdgenError as exc:
                line = {"type": "error", "status": error_status(exc), "detail": str(exc)}
                retry_after = retry_after_s(exc)
                lines.put_nowait(line if retry_after is None else line | {"retry_after": retry_after})

        task = asyncio.create_task(run())
        try:
            while True:
                line = await lines.get()
                yield (json.dumps(line) + "\n").encode()
                if line["type"] != "progress":
                    return
        finally:
            task.cancel()

    @app.get("/api/v1/eink/{species_id}")
    async def eink(
        request: Request,
        species_id: str,
        panel: str,
        palette: str | None = None,
        dither: str | None = None,
        fit: str | None = None,
        pose: str | None = None,
        season: str | None = None,
        seed: int | None = None,
    ) -> Response:
        """A catalogue species for an e-paper panel: the packed buffer the driver writes (layout in
        the X-Eink-* headers), the PNG preview with `Accept: image/png`, or both as JSON."""
        await limit(request)
        species = catalogue.lookup(species_id=species_id)
        if species is None:
            raise HTTPException(404, f"unknown species_id {species_id!r}: not in the catalogue")
        options = {
            "pose": pose,
            "season": season,
            "seed": seed,
            "eink_palette": palette,
            "eink_dither": dither,
            "eink_fit": fit,
        }
        request_fields = {
            "species": species.common_name,
            "scientific_name": species.scientific_name,
            "species_id": species.species_id,
            "format": EINK,
            "eink_panel": panel,
        } | {k: v for k, v in options.items() if v is not None}
        try:
            parsed = image_request(request_fields)
        except RequestError as exc:
            return invalid(exc, where="query", field=EINK_QUERY.get(exc.field, exc.field))
        picture = await state["client"].generate_image(parsed)
        layout = picture.layout
        if _wants(request, "application/json"):
            return JSONResponse(
                {
                    "metadata": picture.metadata,
                    "preview_png": _b64(picture.data),
                    "buffer": _b64(picture.buffer),
                }
            )
        if _wants(request, "image/png"):
            return Response(picture.data, media_type="image/png", headers=_provenance(picture.metadata))
        headers = _provenance(picture.metadata) | {
            "X-Eink-Width": str(picture.width),
            "X-Eink-Height": str(picture.height),
            "X-Eink-Bits-Per-Pixel": str(picture.bits_per_pixel),
            "X-Eink-Row-Bytes": str(layout["row_bytes"]),
            "X-Eink-Palette": picture.palette,
        }
        return Response(picture.buffer, media_type="application/octet-stream", headers=headers)

    # -- batch jobs -----------------------------------------------------------------------------------
    @app.post("/api/v1/batch/images", status_code=202)
    async def batch_images(request: Request) -> JSONResponse:
        """`{"items": [image request, ...]}` -> a job id; the images are made in the background and
        kept in Redis (a gateway restart loses none), GET /api/v1/batch/status/{job_id} reports."""
        await limit(request)
        payload = await body(request)
        items = payload.get("items") if isinstance(payload, dict) else None
        if not isinstance(items, list) or not 1 <= len(items) <= settings.max_batch_items:
            raise RequestError(
                "items",
                items if not isinstance(items, list) else f"{len(items)} items",
                f"a list of 1 to {settings.max_batch_items} image requests",
            )
        requests = []
        for index, item in enumerate(items):
            try:
                parsed = batch_image_request(item)
            except RequestError as exc:
                return invalid(exc, "items", index)
            if parsed.format == EINK:
                return invalid(RequestError("format", EINK, "png, webp or jpeg"), "items", index)
            requests.append(parsed)
        job_id = await state["jobs"].submit(requests)
        return JSONResponse(
            {"job_id": job_id, "status_url": f"/api/v1/batch/status/{job_id}", "total": len(requests)},
            status_code=202,
        )

    @app.get("/api/v1/batch/status/{job_id}")
    async def batch_status(job_id: str) -> JSONResponse:
        """The job's progress and each item's outcome (its file's URL, or the error)."""
        report = await state["jobs"].status(job_id) if valid_job_id(job_id) else None
        if report is None:
            raise HTTPException(404, f"no batch job {job_id!r} (unknown, or expired)")
        for item in report["items"]:
            if item["status"] == "done":
                item["url"] = f"/api/v1/batch/result/{job_id}/{item['index']}"
        return JSONResponse(report)

    @app.get("/api/v1/batch/result/{job_id}/{index}")
    async def batch_result(job_id: str, index: int) -> Response:
        found = await state["jobs"].file(job_id, index) if valid_job_id(job_id) else None
        if found is None:
            raise HTTPException(404, f"batch job {job_id!r} has no image {index} (yet)")
        data, image_format = found
        return Response(data, media_type=MEDIA_TYPES[image_format], headers={"X-AI-Generated": "true"})

    app.state.settings = settings
    app.state.metrics = metrics
    return app
