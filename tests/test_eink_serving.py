"""format=eink through Triton, the clients, the Redis cache and the command: the served panel picture
is render_eink of the served PNG of the same request, byte for byte, wherever it is made."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

from birdgen.client import (
    AsyncBirdClient,
    BirdClient,
    GeneratedEink,
    InvalidRequestError,
    ResponseCache,
    cache_key,
)
from birdgen.eink import render_eink, row_bytes
from birdgen.eink_panels import PRESETS
from birdgen.media import read_metadata
from birdgen.schema import ImageRequest
from tests.conftest import ROBIN
from tests.redis_fixture import RedisServer, redis_server  # noqa: F401
from tests.triton_stats import requests_served

pytestmark = pytest.mark.triton

# One panel per palette kind: 1 bit, 2 bits (a panel whose rows are not whole bytes), 4 bits.
PANELS = [
    {"eink_panel": "400x300"},
    {"eink_panel": "296x128", "eink_palette": "grey4", "eink_dither": "ordered"},
    {"eink_panel": "800x480-7colour", "eink_fit": "contain"},
]


def eink_request(seed: int, **options: str) -> dict[str, Any]:
    return {**ROBIN, "seed": seed, "format": "eink", **options}


@pytest.mark.parametrize("options", PANELS, ids=[o["eink_panel"] for o in PANELS])
def test_served_eink_is_render_eink_of_the_served_png(server, options: dict[str, str]) -> None:
    with BirdClient(server.grpc_url) as client:
        panel = client.generate_image(**eink_request(11, **options))
        png = client.generate_image(**{**ROBIN, "seed": 11})
    local = render_eink(
        png.data,
        options["eink_panel"],
        palette=options.get("eink_palette"),
        dither=options.get("eink_dither"),
        fit=options.get("eink_fit"),
    )
    assert isinstance(panel, GeneratedEink) and not isinstance(png, GeneratedEink)
    assert (panel.buffer, panel.data) == (local.buffer, local.preview_png)
    spec = PRESETS.panels[options["eink_panel"]]
    assert (panel.width, panel.height, panel.panel, panel.palette) == (
        spec.width,
        spec.height,
        local.panel,
        local.palette,
    )
    assert panel.bits_per_pixel == PRESETS.palettes[local.palette].bits_per_pixel
    assert len(panel.buffer) == row_bytes(spec.width, panel.bits_per_pixel) * spec.height
    assert panel.layout == local.layout and panel.layout["row_bytes"] * panel.height == len(panel.buffer)
    # The response metadata is the preview's, plus the timings; the picture is the PNG's (same seed).
    assert {k: v for k, v in panel.metadata.items() if k != "timings_ms"} == read_metadata(panel.data)
    assert panel.metadata["seed"] == png.metadata["seed"] and "eink" in panel.metadata["timings_ms"]
    assert panel.format == "png" and panel.image.size == (spec.width, spec.height)


def test_eink_options_keep_the_derived_seed(server) -> None:
    unseeded = {k: v for k, v in ROBIN.items() if k not in ("seed", "format")}
    with BirdClient(server.grpc_url) as client:
        panel = client.generate_image(**unseeded, **{"format": "eink", "eink_panel": "296x128"})
        png = client.generate_image(**unseeded)
    assert panel.metadata["seed_derived"] and panel.metadata["seed"] == png.metadata["seed"]
    assert panel.data == render_eink(png.data, "296x128").preview_png


def raw_infer(url: str, request: dict[str, Any]) -> dict[str, Any]:
    """Send a request as-is, bypassing the client's own validation."""
    tensor = grpcclient.InferInput("request", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([json.dumps(request).encode()], dtype=np.object_))
    with grpcclient.InferenceServerClient(url) as client:
        return json.loads(client.infer("bird_image", [tensor]).as_numpy("metadata")[0])


BAD = [
    ({"eink_panel": "640x384"}, "eink_panel", "296x128, 400x300, 800x480, 800x480-7colour"),
    ({"eink_panel": "400x300", "eink_palette": "7colour"}, "eink_palette", "bw, grey4"),
    ({"eink_panel": "400x300", "eink_dither": "atkinson"}, "eink_dither", "floyd-steinberg, ordered, none"),
]


@pytest.mark.parametrize(("options", "field", "allowed"), BAD, ids=[b[1] for b in BAD])
def test_bad_eink_options_are_invalid_argument_naming_field_and_allowed(
    server, options: dict[str, str], field: str, allowed: str
) -> None:
    request = eink_request(5, **options)
    with BirdClient(server.grpc_url) as client, pytest.raises(InvalidRequestError) as refused:
        client.generate_image(**request)
    with pytest.raises(InferenceServerException) as served:
        raw_infer(server.grpc_url, request)
    assert "INVALID_ARGUMENT" in str(served.value.status())
    for message in (str(refused.value), served.value.message()):
        assert f"invalid {field!r}" in message and allowed in message
    assert raw_infer(server.grpc_url, eink_request(5, eink_panel="400x300"))["eink"]["panel"] == "400x300"


def test_client_renders_from_the_cached_png_without_the_server(
    server,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    cache = ResponseCache(redis_server.url, registry=CollectorRegistry())
    request = eink_request(31, eink_panel="296x128", eink_palette="grey4")
    start = requests_served(server.grpc_url, "bird_image")
    with BirdClient(server.grpc_url) as plain:
        served = plain.generate_image(**request)
    with BirdClient(server.grpc_url, cache=cache) as client:
        png = client.generate_image(**{**ROBIN, "seed": 31})  # now cached
        before = requests_served(server.grpc_url, "bird_image", at_least=start + 2)
        local = client.generate_image(**request)

        async def from_async_client() -> Any:
            async with AsyncBirdClient(server.grpc_url, cache=cache) as aclient:
                result = await aclient.generate_image(**{**request, "eink_dither": "ordered"})
            await cache.aclose()
            return result

        other = asyncio.run(from_async_client())
        assert requests_served(server.grpc_url, "bird_image") == before  # Triton was not asked
    assert isinstance(local, GeneratedEink) and (local.buffer, local.data) == (served.buffer, served.data)
    assert (local.width, local.height, local.bits_per_pixel) == (served.width, served.height, 2)
    ordered = render_eink(png.data, "296x128", palette="grey4", dither="ordered")
    assert (other.buffer, other.data) == (ordered.buffer, ordered.preview_png)
    assert cache._redis.exists(cache_key(ImageRequest(**request), "bird_image/1"))  # stored under its own key
    cache.close()
