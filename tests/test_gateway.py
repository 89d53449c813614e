"""The HTTP gateway end to end: a real `birdgen gateway` process, the real Triton (tiny model) and a
real Redis. Every endpoint, validation, the rate limit (shared by replicas), batch jobs surviving a
SIGKILLed gateway, and the metrics it exposes."""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from PIL import Image

from birdgen.client import BirdClient
from birdgen.media import read_animation
from birdgen.schema import LIMITS
from birdgen.server import free_port
from tests.conftest import CLIP, ROBIN
from tests.gateway_process import Gateway, running_gateway

pytestmark = pytest.mark.triton
# The robin as the original REST API spells it: common_name and a named resolution (small = 256).
BODY = {k: v for k, v in ROBIN.items() if k not in ("species", "width", "height", "format")}
BODY |= {"common_name": ROBIN["species"], "resolution": "small"}
CLIP_BODY = {**CLIP, "steps": 1}


@pytest.fixture
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    """A client with its own API key: its own rate-limit window, whatever other tests sent."""
    with gateway.client(headers={"X-API-Key": secrets.token_hex(8)}) as client:
        yield client


def test_health_names_triton_models_and_redis(http: httpx.Client) -> None:
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["redis"] == {"reachable": True}
    assert health["triton"]["ready"] and health["triton"]["models"]["bird_image"] == "1"


def test_image_is_the_served_png_with_its_ai_label(http: httpx.Client, server) -> None:
    response = http.post("/api/v1/generate/image", json={**BODY, "seed": 11})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-ai-generated"] == "true" and response.headers["x-birdgen-seed"] == "11"
    with BirdClient(server.grpc_url) as client:
        direct = client.generate_image(**{**ROBIN, "seed": 11})
    assert response.content == direct.data  # common_name + resolution "small" is the same request
    as_json = http.post(
        "/api/v1/generate/image", json={**BODY, "seed": 11}, headers={"Accept": "application/json"}
    )
    payload = as_json.json()
    assert base64.b64decode(payload["data"]) == direct.data and payload["metadata"]["seed"] == 11
    webp = http.post("/api/v1/generate/image", json={**BODY, "seed": 11, "format": "webp"})
    assert webp.headers["content-type"] == "image/webp" and webp.content[:4] == b"RIFF"


@pytest.mark.parametrize(
    ("body", "field", "allowed"),
    [
        ({**BODY, "pose": "upside-down"}, "pose", "perched"),
        ({**BODY, "resolution": "huge"}, "resolution", "small"),
        ({**BODY, "width": 300}, "resolution", "no `width` beside it"),
        ({**BODY, "wingspan": 3}, "wingspan", "species"),
        ({"resolution": "small"}, "species", "non-empty string"),
        ({**BODY, "family": "Turdidae"}, "family", "Passeriformes"),
        ({**BODY, "format": "eink", "eink_panel": "296x128"}, "format", "GET /api/v1/eink"),
        ([1, 2], "request", "JSON object"),
    ],
)
def test_bad_fields_are_422_naming_the_field(
    http: httpx.Client, body: object, field: str, allowed: str
) -> None:
    response = http.post("/api/v1/generate/image", json=body)
    assert response.status_code == 422
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", field] and allowed in detail["allowed"] and repr(field) in detail["msg"]


@pytest.mark.parametrize(
    ("content", "field", "given"),
    [
        (b'{"species": "x", "width": NaN}', "width", None),  # NaN has no standard JSON spelling
        (b'{"species": "x", "seed": -Infinity}', "seed", None),
        (b'{"species": "Robin \\ud800"}', "species", "Robin \\ud800"),  # a lone surrogate, escaped
        (b'{"\\udfff": 1}', "\\udfff", 1),
        (b"[" * 50_000, "request", "(not JSON)"),  # past the JSON parser's recursion limit
        (b'{"species": ' + b"1" * 5000 + b"}", "request", "(not JSON)"),  # past int()'s digit limit
        (b'{"items": NaN}', "items", None),
    ],
    ids=["nan", "infinity", "surrogate-value", "surrogate-key", "deep", "digits", "batch-nan"],
)
def test_bodies_json_cannot_echo_are_still_422(
    http: httpx.Client, content: bytes, field: str, given: object
) -> None:
    # Found by tests/test_fuzz.py: each was a 500 (or a reset connection) from encoding the 422 body.
    path = "/api/v1/batch/images" if field == "items" else "/api/v1/generate/image"
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", field] and detail["input"] == given


def test_not_json_and_oversized_bodies_then_still_serving(http: httpx.Client) -> None:
    broken = http.post(
        "/api/v1/generate/image", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 422 and broken.json()["detail"][0]["loc"] == ["body", "request"]
    # The bound is limits.yaml's (schema.LIMITS.max_body_bytes: a full batch of the largest requests),
    # except for the single image request, which may carry a control image per kind
    # (LIMITS.max_controlled_request_bytes): that body is read, and refused for its field.
    huge = {**BODY, "prompt": "x" * LIMITS.max_body_bytes}
    assert http.post("/api/v1/batch/images", json={"items": [huge]}).status_code == 413
    read = http.post("/api/v1/generate/image", json=huge)
    assert read.status_code == 422 and read.json()["detail"][0]["loc"] == ["body", "prompt"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts what arrives
        yield b'{"items": [{"prompt": "'
        for _ in range(LIMITS.max_body_bytes // 2**16 + 1):
            yield b"y" * 2**16
        yield b'"}]}'

    streamed = http.post(
        "/api/v1/batch/images", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert http.post("/api/v1/generate/image", json={**BODY, "seed": 3}).status_code == 200


def test_an_image_guided_by_a_pose_template(http: httpx.Client) -> None:
    """ControlNet through the gateway (issue 17): a template needs no upload, so batches take it too."""
    control = {"openpose": {"template": "Singing", "scale": 0.5}}
    response = http.post(
        "/api/v1/generate/image",
        json={**BODY, "seed": 17, "control": control},
        headers={"Accept": "application/json"},
    )
    assert response.status_code == 200, response.text
    applied = response.json()["metadata"]["control"]["openpose"]
    assert (applied["source"], applied["template"], applied["scale"]) == ("template", "singing", 0.5)
    image = {**BODY, "control": {"depth": {"image": base64.b64encode(b"\x89PNG").decode()}}}
    batch = http.post("/api/v1/batch/images", json={"items": [{**BODY, "control": control}, image]})
    assert batch.status_code == 422 and batch.json()["detail"][0]["loc"] == [
        "body",
        "items",
        1,
        "control.depth.image",
    ]


def test_animation_by_accept_or_format_and_as_a_progress_stream(http: httpx.Client) -> None:
    gif = http.post("/api/v1/generate/gif", json=CLIP_BODY, headers={"Accept": "image/gif"})
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    assert read_animation(gif.content).frame_count == 16
    webp = http.post("/api/v1/generate/gif", json=CLIP_BODY)
    assert webp.headers["content-type"] == "image/webp" and webp.content[:4] == b"RIFF"
    lines = []
    stream_body = {**CLIP_BODY, "steps": 2, "format": "both"}
    with http.stream(
        "POST", "/api/v1/generate/gif", json=stream_body, headers={"Accept": "application/x-ndjson"}
    ) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    progress, result = lines[:-1], lines[-1]
    assert [(p["done"], p["total"]) for p in progress if p["stage"] == "denoise"] == [(1, 2), (2, 2)]
    assert result["type"] == "result" and set(result["files"]) == {"webp", "gif", "poster"}
    poster = Image.open(BytesIO(base64.b64decode(result["files"]["poster"]["data"])))
    assert poster.size == (CLIP_BODY.get("width", 256), CLIP_BODY.get("height", 256))
    bad = http.post("/api/v1/generate/gif", json={**CLIP_BODY, "fps": 30})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "fps"]


def test_eink_for_a_catalogue_species(http: httpx.Client) -> None:
    raw = http.get("/api/v1/eink/amerob", params={"panel": "296x128", "seed": 4})
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/octet-stream"
    height, row_bytes = int(raw.headers["x-eink-height"]), int(raw.headers["x-eink-row-bytes"])
    assert (int(raw.headers["x-eink-width"]), height) == (296, 128)
    assert len(raw.content) == height * row_bytes
    preview = http.get(
        "/api/v1/eink/amerob", params={"panel": "296x128", "seed": 4}, headers={"Accept": "image/png"}
    )
    assert Image.open(BytesIO(preview.content)).size == (296, 128)
    assert http.get("/api/v1/eink/nosuch1", params={"panel": "296x128"}).status_code == 404
    bad = http.get("/api/v1/eink/amerob", params={"panel": "1x1"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "panel"]


def test_sixty_a_minute_then_429_with_retry_after(gateway: Gateway) -> None:
    key = {"X-API-Key": secrets.token_hex(8)}
    with gateway.client(headers=key) as http:
        # Bad bodies are cheap and still count: the limit is on requests, before any work.
        answers = [http.post("/api/v1/generate/image", json={}).status_code for _ in range(60)]
        assert answers == [422] * 60
        refused = http.post("/api/v1/generate/image", json=BODY)
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    with gateway.client(headers={"X-API-Key": secrets.token_hex(8)}) as other:  # another client's window
        assert other.post("/api/v1/generate/image", json={}).status_code == 422
    assert gateway.client().get("/health").status_code == 200  # health is never limited


def test_the_limit_is_shared_by_replicas_and_keys_are_checked(server, redis_url: str, tmp_path: Path) -> None:
    settings = {"rate_limit_per_minute": 5, "api_keys": "alpha,beta"}
    with (
        running_gateway(server.grpc_url, redis_url, tmp_path, **settings) as one,
        running_gateway(server.grpc_url, redis_url, tmp_path, **settings) as two,
    ):
        key = {"X-API-Key": "alpha"}
        with one.client(headers=key) as a, two.client(headers=key) as b:
            statuses = [
                client.post("/api/v1/generate/image", json={}).status_code for client in (a, b, a, b, a)
            ]
            assert statuses == [422] * 5
            assert b.post("/api/v1/generate/image", json={}).status_code == 429
            assert a.post("/api/v1/generate/image", json={}).status_code == 429
        with one.client(headers={"X-API-Key": "gamma"}) as stranger:
            assert stranger.post("/api/v1/generate/image", json={}).status_code == 401
        with one.client() as anonymous:  # no key: the client's IP is the identity
            assert anonymous.post("/api/v1/generate/image", json={}).status_code == 422


def wait_for(http: httpx.Client, job_id: str, done: int, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = http.get(f"/api/v1/batch/status/{job_id}").json()
        if status["done"] + status["failed"] >= done or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_a_batch_job_survives_a_killed_gateway(server, redis_url: str, tmp_path: Path) -> None:
    items = [{**BODY, "seed": 500 + i} for i in range(6)]
    with (
        running_gateway(server.grpc_url, redis_url, tmp_path, job_lease_s=2) as first,
        first.client() as http,
    ):
        submitted = http.post("/api/v1/batch/images", json={"items": items})
        assert submitted.status_code == 202
        job_id = submitted.json()["job_id"]
        assert wait_for(http, job_id, 1)["done"] >= 1
        first.kill()  # mid-job: its lease runs out, another gateway takes the job over
    with (
        running_gateway(server.grpc_url, redis_url, tmp_path, job_lease_s=2) as second,
        second.client() as http,
    ):
        status = wait_for(http, job_id, len(items))
        assert (status["status"], status["done"], status["failed"], status["progress"]) == ("done", 6, 0, 1.0)
        with BirdClient(server.grpc_url) as client:
            for item in status["items"]:
                got = http.get(item["url"])
                want = client.generate_image(**{**ROBIN, "seed": 500 + item["index"]})
                assert got.content == want.data and item["metadata"]["seed"] == 500 + item["index"]


def test_a_job_waits_out_an_unreachable_triton_and_another_gateway_finishes_it(
    server, redis_url: str, tmp_path: Path
) -> None:
    """The first gateway cannot reach Triton: its items stay pending (an outage is not a failure),
    and once it is gone a gateway that can reach Triton takes the job over and makes all of them."""
    nowhere = f"127.0.0.1:{free_port()}"
    items = [{**BODY, "seed": 600 + i} for i in range(3)]
    settings = {"job_lease_s": 2, "deadline_s": 2}
    with running_gateway(nowhere, redis_url, tmp_path, healthy=False, **settings) as cut_off:
        with cut_off.client() as http:
            assert http.get("/health").json()["triton"]["ready"] is False
            job_id = http.post("/api/v1/batch/images", json={"items": items}).json()["job_id"]
            assert "waits for the server" in wait_in_log(cut_off, "waits for the server")
            status = http.get(f"/api/v1/batch/status/{job_id}").json()
        assert (status["done"], status["failed"]) == (0, 0)
        assert {item["status"] for item in status["items"]} == {"pending"}
        cut_off.kill()
    with running_gateway(server.grpc_url, redis_url, tmp_path, **settings) as second, second.client() as http:
        status = wait_for(http, job_id, len(items))
        assert (status["status"], status["done"], status["failed"]) == ("done", 3, 0)
        metrics = http.get("/metrics").text
    assert 'birdgen_gateway_batch_items_total{outcome="done"} 3.0' in metrics  # all made by the second


def wait_in_log(gateway: Gateway, text: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in (log := gateway.log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return log


def test_batch_validation_and_unknown_jobs(http: httpx.Client) -> None:
    bad = http.post("/api/v1/batch/images", json={"items": [BODY, {**BODY, "season": "monsoon"}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "items", 1, "season"]
    assert http.post("/api/v1/batch/images", json={"items": []}).status_code == 422
    too_many = http.post("/api/v1/batch/images", json={"items": [BODY] * 101})
    assert too_many.status_code == 422 and "1 to 100" in too_many.json()["detail"][0]["allowed"]
    assert http.get("/api/v1/batch/status/" + "0" * 32).status_code == 404
    assert http.get("/api/v1/batch/status/../../etc").status_code == 404


def test_metrics_count_requests_cache_and_refusals(gateway: Gateway, http: httpx.Client) -> None:
    for _ in range(2):
        assert http.post("/api/v1/generate/image", json={**BODY, "seed": 77}).status_code == 200
    text = gateway.client().get("/metrics").text
    assert 'birdgen_gateway_requests_total{route="/api/v1/generate/image",status="200"}' in text
    assert (
        'birdgen_gateway_request_duration_seconds_bucket{le="0.005",route="/api/v1/generate/image"}' in text
    )
    assert 'birdgen_cache_hits_total{kind="image"}' in text  # the repeat came from Redis
    assert "birdgen_gateway_rate_limited_total" in text


def test_cors_and_openapi(server, redis_url: str, tmp_path: Path) -> None:
    origin = "https://chirpneighbors.example"
    with (
        running_gateway(server.grpc_url, redis_url, tmp_path, cors_origins=origin) as gateway,
        gateway.client() as http,
    ):
        preflight = http.options(
            "/api/v1/generate/image",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == origin
        other = http.options(
            "/api/v1/generate/image",
            headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in other.headers
        spec = http.get("/openapi.json").json()
    body = spec["paths"]["/api/v1/generate/image"]["post"]["requestBody"]["content"]["application/json"]
    assert {"common_name", "resolution", "species", "pose", "seed"} <= set(body["schema"]["properties"])
    assert "/api/v1/batch/status/{job_id}" in spec["paths"]
