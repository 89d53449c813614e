"""The gateway's request bodies without a Triton server: the per-route body bounds (control images,
an svd animation's picture) and the batch rule for control images. The app runs in-process with
Triton and Redis at closed ports; everything tested here is decided before either is needed (the rate
limit fails open without Redis)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.types import Receive, Scope, Send

from birdgen.gateway.app import ANIMATION_ROUTE, IMAGE_ROUTE, BodyLimit, create_app
from birdgen.gateway.bodies import batch_image_request
from birdgen.gateway.settings import GatewaySettings
from birdgen.request_error import RequestError
from birdgen.schema import LIMITS
from birdgen.server import free_port
from tests.conftest import CLIP, ROBIN

BATCH_ROUTE = "/api/v1/batch/images"
# A test app's bounds: batches and other routes, the animation route, the image route.
SMALL, MEDIUM, LARGE = 2048, 4096, 8192
ROUTE_LIMITS = {IMAGE_ROUTE: LARGE, ANIMATION_ROUTE: MEDIUM}
SVD_CLIP = {k: v for k, v in CLIP.items() if k != "behaviour"} | {"engine": "svd"}


def png_base64(colour: tuple[int, int, int] = (200, 10, 10)) -> str:
    data = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(data, "PNG")
    return base64.b64encode(data.getvalue()).decode()


async def echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """An app that reads the whole body and answers its length."""
    size, more = 0, True
    while more:
        message = await receive()
        size, more = size + len(message.get("body", b"")), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


@pytest.fixture(scope="module")
def limited() -> TestClient:
    return TestClient(BodyLimit(echo_length, SMALL, routes=ROUTE_LIMITS))  # no lifespan


@pytest.mark.parametrize(
    ("path", "size", "status"),
    [
        (IMAGE_ROUTE, LARGE, 200),
        (IMAGE_ROUTE, LARGE + 1, 413),
        (ANIMATION_ROUTE, MEDIUM, 200),
        (ANIMATION_ROUTE, MEDIUM + 1, 413),
        (BATCH_ROUTE, SMALL, 200),
        (BATCH_ROUTE, SMALL + 1, 413),
        ("/api/v1/eink/amerob", SMALL + 1, 413),
        (IMAGE_ROUTE + "/", SMALL + 1, 413),  # the exact path only
        (ANIMATION_ROUTE + "/", SMALL + 1, 413),
    ],
)
def test_the_body_bound_is_per_route_announced_or_streamed(
    limited: TestClient, path: str, size: int, status: int
) -> None:
    announced = limited.post(path, content=b"x" * size)
    assert announced.status_code == status

    def chunks() -> Iterator[bytes]:  # no Content-Length: the bound counts what arrives
        for start in range(0, size, 1000):
            yield b"x" * min(1000, size - start)

    streamed = limited.post(path, content=chunks())
    assert streamed.status_code == status
    if status == 413:
        limit = ROUTE_LIMITS.get(path, SMALL)
        assert streamed.json() == {"detail": f"request body over {limit} bytes"}
    else:
        assert streamed.text == str(size)


def test_the_image_route_fits_a_control_image_per_kind_and_batches_keep_the_small_bound() -> None:
    settings = GatewaySettings()
    controlled = LIMITS.max_controlled_request_bytes
    assert settings.max_image_body_bytes == controlled <= LIMITS.serving.max_request_bytes
    assert settings.max_body_bytes == LIMITS.max_body_bytes < settings.max_image_body_bytes
    lowered = GatewaySettings.from_env({"BIRDGEN_MAX_IMAGE_BODY_BYTES": str(LIMITS.max_body_bytes)})
    assert lowered.max_image_body_bytes == LIMITS.max_body_bytes
    with pytest.raises(ValueError, match="max_image_body_bytes"):
        GatewaySettings(max_image_body_bytes=LIMITS.max_controlled_request_bytes + 1)
    app = create_app(settings)
    (limit,) = [m for m in app.user_middleware if m.cls is BodyLimit]
    assert limit.kwargs == {
        "limit": LIMITS.max_body_bytes,
        "routes": {
            IMAGE_ROUTE: LIMITS.max_controlled_request_bytes,
            ANIMATION_ROUTE: LIMITS.max_svd_request_bytes,
        },
    }


def test_the_animation_route_fits_an_svd_picture_and_may_only_be_lowered() -> None:
    settings = GatewaySettings()
    assert (
        settings.max_animation_body_bytes == LIMITS.max_svd_request_bytes <= LIMITS.serving.max_request_bytes
    )
    assert settings.max_body_bytes < settings.max_animation_body_bytes
    lowered = GatewaySettings.from_env({"BIRDGEN_MAX_ANIMATION_BODY_BYTES": str(LIMITS.max_body_bytes)})
    assert lowered.max_animation_body_bytes == LIMITS.max_body_bytes
    assert lowered.max_image_body_bytes == LIMITS.max_controlled_request_bytes  # each route its own
    with pytest.raises(ValueError, match="max_animation_body_bytes"):
        GatewaySettings.from_env({"BIRDGEN_MAX_ANIMATION_BODY_BYTES": str(LIMITS.max_svd_request_bytes + 1)})
    (limit,) = [m for m in create_app(lowered).user_middleware if m.cls is BodyLimit]
    assert limit.kwargs["routes"][ANIMATION_ROUTE] == LIMITS.max_body_bytes


def test_a_batch_item_takes_a_template_but_not_an_image() -> None:
    templated = batch_image_request({**ROBIN, "control": {"openpose": {"template": "Singing"}}})
    assert templated.control is not None and templated.control.openpose is not None
    assert templated.control.openpose.template == "singing"
    with pytest.raises(RequestError) as refused:
        batch_image_request({**ROBIN, "control": {"Depth": {"image": png_base64(), "scale": 0.5}}})
    assert refused.value.field == "control.depth.image"
    assert "template" in refused.value.allowed and "/api/v1/generate/image" in refused.value.allowed


@pytest.fixture(scope="module")
def gateway() -> Iterator[TestClient]:
    """The whole app, on a Triton and a Redis that are not there (closed ports)."""
    settings = GatewaySettings(
        triton_url=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        max_body_bytes=SMALL,
        max_animation_body_bytes=MEDIUM,
        max_image_body_bytes=LARGE,
        deadline_s=2,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_the_app_bounds_the_image_route_and_refuses_a_batch_image_by_its_item(gateway: TestClient) -> None:
    # Over the small bound but within the image route's: read, and refused for its field, not its size.
    long = gateway.post(IMAGE_ROUTE, json={**ROBIN, "prompt": "x" * SMALL})
    assert long.status_code == 422 and long.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert gateway.post(IMAGE_ROUTE, json={**ROBIN, "prompt": "x" * LARGE}).status_code == 413
    assert gateway.post(BATCH_ROUTE, json={"items": [{**ROBIN, "prompt": "x" * SMALL}]}).status_code == 413
    item = {**ROBIN, "control": {"openpose": {"template": "perched"}}}
    image = {**ROBIN, "control": {"openpose": {"image": png_base64()}}}
    batch = gateway.post(BATCH_ROUTE, json={"items": [item, image]})
    assert batch.status_code == 422, batch.text
    (detail,) = batch.json()["detail"]
    assert detail["loc"] == ["body", "items", 1, "control.openpose.image"]
    assert "template" in detail["allowed"]


def test_the_app_bounds_the_animation_route_and_checks_an_svd_picture_before_triton(
    gateway: TestClient,
) -> None:
    # Over the small bound but within the animation route's: read, and refused for its field.
    long = gateway.post(ANIMATION_ROUTE, json={**CLIP, "prompt": "x" * SMALL})
    assert long.status_code == 422 and long.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert gateway.post(ANIMATION_ROUTE, json={**CLIP, "prompt": "x" * MEDIUM}).status_code == 413
    assert gateway.post(ANIMATION_ROUTE, json={**SVD_CLIP, "image": "x" * MEDIUM}).status_code == 413
    # Not base64: the schema's 422 naming `image`.
    syntax = gateway.post(ANIMATION_ROUTE, json={**SVD_CLIP, "image": "not base64!"})
    assert syntax.status_code == 422 and syntax.json()["detail"][0]["loc"] == ["body", "image"]
    # Base64 of no picture: the client's local decode, before Triton (closed here) is asked.
    not_a_picture = base64.b64encode(b"not a picture at all").decode()
    decoded = gateway.post(ANIMATION_ROUTE, json={**SVD_CLIP, "image": not_a_picture})
    assert decoded.status_code == 422, decoded.text
    assert decoded.json()["detail"].startswith("invalid 'image': got \"20 bytes starting")
    # Streamed (NDJSON): the same refusal as the stream's one line.
    streamed = gateway.post(
        ANIMATION_ROUTE,
        json={**SVD_CLIP, "image": not_a_picture},
        headers={"Accept": "application/x-ndjson"},
    )
    (line,) = [json.loads(text) for text in streamed.text.splitlines()]
    assert (line["type"], line["status"]) == ("error", 422) and line["detail"] == decoded.json()["detail"]
    # An image on an AnimateDiff request is the schema's refusal, naming it.
    refused = gateway.post(ANIMATION_ROUTE, json={**CLIP, "image": png_base64()})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "image"]
