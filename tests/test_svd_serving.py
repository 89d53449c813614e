"""Stable Video Diffusion clips served (issue 18): the in-process pipeline equals diffusers'
StableVideoDiffusionPipeline on the tiny SVD folder, the served bytes equal the in-process ones, the
still is the image entry's own picture, UNet calls batch across requests, bad input is refused.

Tolerance: `assert_close_to_reference` (at most 1 uint8 level on at most 0.1% of values), as the
image path; docs/svd.md has the measured fractions (the VAE encoder's contiguous input alone flips
~0.03% of values by one level).
"""

from __future__ import annotations

import base64
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from tritonclient.utils import InferenceServerException

from birdgen.contracts import SVD_FOLDER, SVD_UNET
from birdgen.media import read_animation
from birdgen.schema import AnimationRequest, ImageRequest
from tests.test_animation_serving import raw_animation
from tests.test_input_image import png_base64, with_size
from tests.test_parity import assert_close_to_reference
from tests.test_serving import raw_infer, read_pixels
from tests.triton_stats import inferences_and_executions

pytestmark = pytest.mark.triton

# Three frames (0.5 s at 6 fps), two steps, chunks of two: the last chunk is a shorter call.
SVD_CLIP = {
    "species": "American Robin",
    "engine": "svd",
    "width": 256,
    "height": 256,
    "fps": 6,
    "duration_seconds": 0.5,
    "steps": 2,
    "decode_chunk_size": 2,
    "format": "webp",
    "seed": 21,
}


@pytest.fixture(scope="module")
def svd_reference(tiny_model):  # type: ignore[no-untyped-def]
    from diffusers import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_pretrained(tiny_model / SVD_FOLDER, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_clip(pipe, picture: Image.Image, request: AnimationRequest, seed: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    frames = pipe(
        picture,
        height=request.height,
        width=request.width,
        num_frames=request.num_frames,
        num_inference_steps=request.steps,
        fps=request.fps,
        motion_bucket_id=request.motion_bucket_id,
        noise_aug_strength=request.noise_aug_strength,
        min_guidance_scale=request.min_guidance_scale,
        max_guidance_scale=request.max_guidance_scale,
        decode_chunk_size=request.decode_chunk_size,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).frames[0]
    return (frames * 255).round().astype(np.uint8)


def test_a_client_picture_animates_like_diffusers_and_serves_the_same_bytes(
    server, animation_pipeline, svd_reference
) -> None:
    payload = {**SVD_CLIP, "image": png_base64(seed=3)}
    request = AnimationRequest(**payload)
    local = animation_pipeline(request)
    picture = Image.open(io.BytesIO(base64.b64decode(payload["image"]))).convert("RGB")
    assert_close_to_reference(local.frames, diffusers_clip(svd_reference, picture, request, 21))
    served = raw_animation(server.grpc_url, payload)
    assert served["webp"] == local.files["webp"] and served["poster"] == local.files["poster"]
    metadata = json.loads(served["metadata"])
    assert metadata["engine"] == "svd" and metadata["frames"] == 3 and metadata["image"]["source"] == "client"
    assert metadata["request"]["image"]["image_sha256"] == request.image.sha256  # never the picture
    assert {"svd_image_encoder", "svd_vae_encoder", "svd_unet", "svd_vae_decoder"} <= set(
        metadata["timings_ms"]
    )
    assert read_animation(served["webp"]).frame_count == 3


def test_without_a_picture_the_clip_animates_the_served_still(
    server, animation_pipeline, svd_reference
) -> None:
    request = AnimationRequest(**{**SVD_CLIP, "seed": None, "max_guidance_scale": 1.0})  # no guidance
    still = request.still_request()
    assert isinstance(still, ImageRequest) and still.pose == request.pose
    data, still_metadata = raw_infer(server.grpc_url, still.to_json())
    local = animation_pipeline(request)
    assert local.metadata["image"]["source"] == "drawn"
    assert local.metadata["image"]["seed"] == still_metadata["seed"]
    want = diffusers_clip(svd_reference, Image.fromarray(read_pixels(data)), request, local.metadata["seed"])
    assert_close_to_reference(local.frames, want)


def test_concurrent_svd_requests_are_each_their_own_clip(server) -> None:
    payloads = [{**SVD_CLIP, "image": png_base64(seed=40 + i), "seed": 50 + i} for i in range(3)]
    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        clips = list(pool.map(lambda p: raw_animation(server.grpc_url, p), payloads))
    assert len({clip["webp"] for clip in clips}) == len(payloads)


def test_svd_unet_calls_of_different_requests_share_a_batch(server) -> None:
    """The entry sends each step's two guidance halves as one call of two items; calls of different
    clips queued together run as one execution, each item answered as if alone. (Served clips of the
    tiny model rarely queue at the UNet: its call is short next to the rest of a request.)"""
    import tritonclient.grpc as grpcclient

    from birdgen.stages import repository_specs

    manifest = json.loads((server.model_repository / "manifest.json").read_text())
    spec = repository_specs(manifest)[SVD_UNET]
    sizes = {"frames": 3, "latent_height": 32, "latent_width": 32}
    calls = [spec.sample_inputs(2, sizes, 0, seed=seed) for seed in range(8)]

    def tensors(inputs: dict[str, np.ndarray]) -> list:
        out = []
        for name, value in inputs.items():
            tensor = grpcclient.InferInput(name, list(value.shape), "FP32")
            tensor.set_data_from_numpy(value)
            out.append(tensor)
        return out

    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        alone = [client.infer(SVD_UNET, tensors(inputs)).as_numpy("noise_pred") for inputs in calls[:2]]
        inferences_before, executions_before = inferences_and_executions(server.grpc_url, SVD_UNET)
        prepared = [tensors(inputs) for inputs in calls]
        results: list = [None] * len(calls)
        done = threading.Semaphore(0)

        def answered(index: int):  # type: ignore[no-untyped-def]
            def callback(result, error) -> None:  # type: ignore[no-untyped-def]
                results[index] = error or result.as_numpy("noise_pred")
                done.release()

            return callback

        for index, inputs in enumerate(prepared):  # all queued while the first one runs
            client.async_infer(SVD_UNET, inputs, answered(index))
        for _ in calls:
            assert done.acquire(timeout=120)
    together = results
    assert all(isinstance(r, np.ndarray) for r in together), together
    inferences, executions = inferences_and_executions(
        server.grpc_url, SVD_UNET, inferences_before + 2 * len(calls)
    )
    assert inferences - inferences_before == 2 * len(calls)
    assert executions - executions_before < len(calls)
    for one, batched in zip(alone, together, strict=False):
        np.testing.assert_allclose(batched, one, atol=1e-5)


def _header_bomb() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "PNG")
    return base64.b64encode(with_size(buffer.getvalue(), 60000, 60000)).decode()


BAD = {
    "not an image": ({**SVD_CLIP, "image": base64.b64encode(b"GIF89a nope").decode()}, "image", "PNG"),
    "header bomb": ({**SVD_CLIP, "image": _header_bomb()}, "image", "pixels"),
    "guidance": (
        {**SVD_CLIP, "min_guidance_scale": 4.0, "max_guidance_scale": 2.0},
        "max_guidance_scale",
        "min",
    ),
    "svd field on animatediff": (
        {"species": "American Robin", "engine": "animatediff", "motion_bucket_id": 10},
        "motion_bucket_id",
        "svd",
    ),
}


@pytest.mark.parametrize(("payload", "field", "hint"), BAD.values(), ids=list(BAD))
def test_bad_svd_input_is_invalid_argument_and_the_server_keeps_serving(server, payload, field, hint) -> None:
    with pytest.raises(InferenceServerException) as caught:
        raw_animation(server.grpc_url, payload)
    assert "INVALID_ARGUMENT" in str(caught.value.status())
    assert repr(field) in caught.value.message() and hint in caught.value.message()
    good = raw_animation(server.grpc_url, {**SVD_CLIP, "image": png_base64(seed=9)})
    assert good["webp"][:4] == b"RIFF"


def test_the_cli_and_the_progress_stream_draw_an_svd_clip(server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from birdgen.client import BirdClient
    from tests.test_cli import run

    picture = tmp_path / "robin.png"
    picture.write_bytes(base64.b64decode(png_base64(seed=5)))
    args = [
        "generate",
        "animation",
        "--url",
        server.grpc_url,
        "--species",
        "American Robin",
        "--engine",
        "svd",
    ]
    args += ["--image", str(picture), "--width", "256", "--height", "256", "--fps", "6"]
    args += ["--duration-seconds", "0.5", "--steps", "2", "--decode-chunk-size", "2", "--seed", "21"]
    done = run(*args, "--out", str(tmp_path / "clip.webp"))
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["engine"] == "svd" and printed["image"]["source"] == "client"
    messages: list[dict] = []
    with BirdClient(server.grpc_url) as client:
        # The CLI's default format is both (a GIF beside the WebP); the format is in the embedded metadata.
        request = {**SVD_CLIP, "image": picture, "format": "both"}
        streamed = client.generate_animation(**request, on_progress=messages.append)
    assert [(m["done"], m["total"]) for m in messages if m["stage"] == "denoise"] == [(1, 2), (2, 2)]
    assert [(m["done"], m["total"]) for m in messages if m["stage"] == "decode"] == [(2, 3), (3, 3)]
    assert streamed.files["webp"] == (tmp_path / "clip.webp").read_bytes()
