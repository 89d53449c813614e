"""The served path: determinism, concurrency with batching, bad input, formats and metadata, restarts."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from birdgen.client import BirdClient, InvalidRequestError, ServerUnavailableError
from birdgen.media import DIGITAL_SOURCE_TYPE, read_metadata
from birdgen.schema import ImageRequest
from birdgen.server import free_port
from tests.conftest import ROBIN
from tests.triton_stats import cache_hits, inferences_and_executions

pytestmark = pytest.mark.triton


def raw_infer(url: str, payload: str | bytes) -> tuple[bytes, dict]:
    """Send a request as-is, bypassing the client's own validation."""
    data = payload.encode() if isinstance(payload, str) else payload
    tensor = grpcclient.InferInput("request", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer("bird_image", [tensor])
    return result.as_numpy("image")[0], json.loads(result.as_numpy("metadata")[0])


def test_served_bytes_equal_the_in_process_pipeline(server, local_pipeline) -> None:
    """Same request -> same bytes, across processes (the server's cache is not what makes it so)."""
    request = {**ROBIN, "seed": 7, "format": "webp"}
    with BirdClient(server.grpc_url) as client:
        served = client.generate_image(**request)
    local_a = local_pipeline(ImageRequest(**request))
    local_b = local_pipeline(ImageRequest(**request))
    assert served.data == local_a.data == local_b.data
    assert local_pipeline(ImageRequest(**{**request, "seed": 8})).data != served.data


def test_eight_concurrent_requests_batch_in_the_unet_and_match_sequential(server, local_pipeline) -> None:
    requests = [{**ROBIN, "seed": 100 + i, "steps": 4} for i in range(8)]
    inferences_before, executions_before = inferences_and_executions(server.grpc_url, "unet")

    def generate(request: dict) -> bytes:
        with BirdClient(server.grpc_url) as client:
            return client.generate_image(**request).data

    with ThreadPoolExecutor(max_workers=8) as pool:
        served = list(pool.map(generate, requests))
    inferences, executions = inferences_and_executions(server.grpc_url, "unet", inferences_before + 8 * 4)
    assert inferences - inferences_before == 8 * 4
    # Fewer UNet executions than UNet inferences: concurrent requests shared UNet batches.
    assert executions - executions_before < inferences - inferences_before
    assert len(set(served)) == 8
    for request, data in zip(requests, served, strict=True):
        sequential = local_pipeline(ImageRequest(**request))
        served_pixels = np.asarray(read_pixels(data), dtype=np.int16)
        # Batched UNet runs may reorder float sums; at most one uint8 level, on few values.
        diff = np.abs(served_pixels - sequential.pixels.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


def read_pixels(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


BAD_REQUESTS = [
    ({**ROBIN, "pose": "upside-down"}, "pose", "perched"),
    ({**ROBIN, "season": "monsoon"}, "season", "spring"),
    ({**ROBIN, "style": "cubist"}, "style", "photo"),
    ({**ROBIN, "lighting": "disco"}, "lighting", "golden-hour"),
    ({**ROBIN, "family": "Dinosauria"}, "family", "Passeriformes"),
    ({**ROBIN, "width": 4096}, "width", "2048"),
    ({**ROBIN, "height": 200}, "height", "256"),
    ({**ROBIN, "width": 500}, "width", "multiple of 64"),
    ({**ROBIN, "steps": 9}, "steps", "1..4"),
    ({**ROBIN, "steps": 0}, "steps", "1..4"),
    ({**ROBIN, "species": "x" * 5000}, "species", "100"),
    ({**ROBIN, "prompt": "p" * 20000}, "prompt", "1000"),
    ({k: v for k, v in ROBIN.items() if k != "species"}, "species", "missing"),
    ({**ROBIN, "format": "bmp"}, "format", "png"),
    ({**ROBIN, "colour": "red"}, "colour", "species"),
]


@pytest.mark.parametrize(("payload", "field", "hint"), BAD_REQUESTS, ids=[b[1] for b in BAD_REQUESTS])
def test_bad_request_is_invalid_argument_naming_the_field_and_server_keeps_serving(
    server, payload, field, hint
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        raw_infer(server.grpc_url, json.dumps(payload))
    assert "INVALID_ARGUMENT" in str(caught.value.status())
    message = caught.value.message()
    assert repr(field) in message and hint in message
    image, metadata = raw_infer(server.grpc_url, json.dumps({**ROBIN, "seed": 5}))
    assert image[:8] == b"\x89PNG\r\n\x1a\n" and metadata["seed"] == 5


def test_malformed_json_is_invalid_argument(server) -> None:
    for payload in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(InferenceServerException) as caught:
            raw_infer(server.grpc_url, payload)
        assert "INVALID_ARGUMENT" in str(caught.value.status())
        assert "'request'" in caught.value.message()


def test_client_rejects_bad_request_before_sending() -> None:
    # Nothing listens on this port: a local validation error proves nothing was sent.
    with (
        BirdClient(f"127.0.0.1:{free_port()}", deadline_s=5) as client,
        pytest.raises(InvalidRequestError) as e,
    ):
        client.generate_image(**{**ROBIN, "pose": "upside-down"})
    assert "'pose'" in str(e.value) and "perched" in str(e.value)


def test_unreachable_server_is_a_typed_error_naming_the_url() -> None:
    url = f"127.0.0.1:{free_port()}"
    with BirdClient(url, deadline_s=5) as client, pytest.raises(ServerUnavailableError) as caught:
        client.generate_image(**ROBIN)
    assert caught.value.url == url and url in str(caught.value)


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_each_format_carries_its_metadata_and_ai_label(server, fmt) -> None:
    with BirdClient(server.grpc_url) as client:
        image = client.generate_image(**{**ROBIN, "format": fmt, "width": 384})
    assert image.format == fmt and image.image.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
    assert image.image.size == (384, 256)
    embedded = read_metadata(image.data)
    assert embedded == {k: v for k, v in image.metadata.items() if k != "timings_ms"}
    assert embedded["ai_generated"] is True and embedded["seed"] == 42 and embedded["format"] == fmt
    assert "American Robin" in embedded["prompt"] and embedded["model_version"].startswith("tiny-sdxl-turbo-")
    timings = image.metadata["timings_ms"]
    assert set(timings) == {"text_encoders", "unet", "vae_decoder", "encode", "stage_calls", "total"}
    # Nested intervals, each rounded to a microsecond on its own.
    assert (
        timings["stage_calls"] <= timings["text_encoders"] + timings["unet"] + timings["vae_decoder"] + 0.01
    )
    assert sum(v for k, v in timings.items() if k not in ("stage_calls", "total")) <= timings["total"] + 0.01
    assert DIGITAL_SOURCE_TYPE.encode() in image.data


def test_expert_prompt_override_is_used_verbatim(server) -> None:
    with BirdClient(server.grpc_url) as client:
        image = client.generate_image(**ROBIN, prompt="a robin on a fence", negative_prompt="cats")
    assert image.metadata["prompt"] == "a robin on a fence"
    assert image.metadata["negative_prompt"] == "cats"


def test_repeated_request_is_answered_from_tritons_response_cache(server) -> None:
    request = json.dumps({**ROBIN, "seed": 31337})
    hits = cache_hits(server.grpc_url, "bird_image")
    first = raw_infer(server.grpc_url, request)
    assert raw_infer(server.grpc_url, request) == first
    assert cache_hits(server.grpc_url, "bird_image", at_least=hits + 1) == hits + 1


def test_text_encoders_answer_repeated_token_ids_from_the_response_cache(server) -> None:
    """The second level behind each entry instance's own prompt cache: Triton's response cache on the
    CPU-hosted encoders, shared by every instance. Same token ids -> a cache hit, the same outputs."""
    ids = np.arange(77, dtype=np.int64)[None] + 7  # within the tiny vocabulary
    tensor = grpcclient.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for name in ("text_encoder", "text_encoder_2"):
            runs, _ = inferences_and_executions(server.grpc_url, name)
            hits = cache_hits(server.grpc_url, name)
            first = client.infer(name, [tensor]).as_numpy("hidden_states")
            second = client.infer(name, [tensor]).as_numpy("hidden_states")
            assert inferences_and_executions(server.grpc_url, name, runs + 1)[0] == runs + 1, name
            assert cache_hits(server.grpc_url, name, hits + 1) == hits + 1, name
            np.testing.assert_array_equal(first, second)
