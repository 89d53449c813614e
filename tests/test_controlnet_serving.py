"""ControlNet guidance served (issue 17): parity with diffusers' StableDiffusionXLControlNetPipeline on
the tiny model's ControlNets, scale 0 equal to no control, batching across requests, bad control
images refused while the server keeps serving.

The session export picks up the tiny model's `controlnet-openpose` and `controlnet-depth` folders, so
these run on the session server. Tolerance: `assert_close_to_reference` (at most 1 uint8 level on at
most 0.1% of values); measured on the tiny model, 1.5e-5 to 2.4e-5 of values differ by 1 level (the
engines' float reordering), none by more.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image
from tritonclient.utils import InferenceServerException

from birdgen.contracts import CONTROLNET_KINDS, controlnet_folder, controlnet_model
from birdgen.control_templates import render_template
from birdgen.ensemble.controlnet import prepare_controls
from birdgen.request_error import RequestError
from birdgen.schema import ImageRequest
from tests.conftest import ROBIN
from tests.test_input_image import png_base64, with_size
from tests.test_parity import assert_close_to_reference
from tests.test_serving import raw_infer, read_pixels
from tests.triton_stats import inferences_and_executions

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def controlnets(tiny_model):  # type: ignore[no-untyped-def]
    from diffusers import ControlNetModel

    return {
        kind: ControlNetModel.from_pretrained(tiny_model / controlnet_folder(kind))
        for kind in CONTROLNET_KINDS
    }


def diffusers_controlled(
    reference_pipeline, controlnets, request: ImageRequest, metadata: dict
) -> np.ndarray:  # type: ignore[no-untyped-def]
    """What StableDiffusionXLControlNetPipeline draws for the served request: one net, or a
    MultiControlNetModel of the request's nets in their order."""
    from diffusers import StableDiffusionXLControlNetPipeline

    settings = request.control_settings()
    images = [
        render_template(s.kind, s.template, request.width, request.height)
        if s.template is not None
        else Image.open(io.BytesIO(base64.b64decode(s.image or ""))).convert("RGB")
        for s in settings
    ]
    nets = [controlnets[s.kind] for s in settings]
    single = len(settings) == 1
    pipe = StableDiffusionXLControlNetPipeline.from_pipe(
        reference_pipeline, controlnet=nets[0] if single else nets
    )
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        metadata["prompt"],
        image=images[0] if single else images,
        controlnet_conditioning_scale=settings[0].scale if single else [s.scale for s in settings],
        control_guidance_start=[s.start for s in settings],
        control_guidance_end=[s.end for s in settings],
        num_inference_steps=request.steps,
        guidance_scale=0.0,
        width=request.width,
        height=request.height,
        generator=torch.Generator("cpu").manual_seed(metadata["seed"]),
    ).images[0]
    return np.asarray(image)


CASES = {
    "openpose client image": {"steps": 1, "control": {"openpose": {"image": png_base64()}}},
    "depth template from step 2": {"steps": 2, "control": {"depth": {"template": "perched", "start": 0.5}}},
    "both, non-square": {
        "steps": 4,
        "width": 384,
        "height": 256,
        "control": {
            "openpose": {"template": "flying", "end": 0.5},
            "depth": {"template": "flying", "scale": 0.6},
        },
    },
}


@pytest.mark.parametrize("extra", CASES.values(), ids=list(CASES))
def test_served_controlled_image_matches_diffusers_controlnet_pipeline(
    server, reference_pipeline, controlnets, local_pipeline, extra
) -> None:
    payload = {**ROBIN, "seed": 7, **extra}
    data, metadata = raw_infer(server.grpc_url, json.dumps(payload))
    request = ImageRequest(**payload)
    pixels = read_pixels(data)
    assert_close_to_reference(
        pixels, diffusers_controlled(reference_pipeline, controlnets, request, metadata)
    )
    assert metadata["unet"] == {"model": "controlled_unet", "version": 1}
    settings = request.control_settings()
    assert metadata["control"] == {s.kind: s.metadata(request.steps) for s in settings}
    assert "image" not in json.dumps(metadata["request"]["control"]).replace("image_", "")  # digests only
    assert metadata["timings_ms"]["controlnet"] > 0
    uncontrolled = local_pipeline(request.model_copy(update={"control": None}))
    assert metadata["seed"] == uncontrolled.metadata["seed"]  # control keeps the scene's seed
    assert np.abs(pixels.astype(np.int16) - uncontrolled.pixels.astype(np.int16)).mean() > 0.05


def test_scale_zero_is_the_uncontrolled_image_byte_for_byte(server, local_pipeline) -> None:
    off = {"openpose": {"template": "perched", "scale": 0}, "depth": {"image": png_base64(), "scale": 0.0}}
    data, metadata = raw_infer(server.grpc_url, json.dumps({**ROBIN, "steps": 1, "control": off}))
    plain, plain_metadata = raw_infer(server.grpc_url, json.dumps({**ROBIN, "steps": 1}))
    assert read_pixels(data).tobytes() == read_pixels(plain).tobytes()
    assert metadata["seed"] == plain_metadata["seed"] and metadata["unet"]["model"] == "unet"
    assert metadata["control"]["openpose"]["scale"] == 0  # recorded, but drawn by the plain UNet
    # A window with no whole step inside it is as good as off: at 1 step only 0..1 runs.
    windowed = {"openpose": {"template": "perched", "end": 0.9}}
    data, metadata = raw_infer(server.grpc_url, json.dumps({**ROBIN, "steps": 1, "control": windowed}))
    assert read_pixels(data).tobytes() == read_pixels(plain).tobytes()
    assert metadata["control"]["openpose"]["steps_applied"] == [0]


def test_concurrent_controlled_requests_batch_in_the_controlnet_and_match_in_process(
    server, local_pipeline
) -> None:
    scales = (0.3, 0.5, 0.8, 1.0, 1.4, 2.0)
    payloads = [
        {**ROBIN, "seed": 300 + i, "control": {"openpose": {"template": "singing", "scale": s}}}
        for i, s in enumerate(scales)
    ]
    model = controlnet_model("openpose")
    inferences_before, executions_before = inferences_and_executions(server.grpc_url, model)
    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        served = list(pool.map(lambda p: raw_infer(server.grpc_url, json.dumps(p))[0], payloads))
    steps = ROBIN["steps"]
    inferences, executions = inferences_and_executions(
        server.grpc_url, model, inferences_before + len(payloads) * steps
    )
    assert inferences - inferences_before == len(payloads) * steps
    # Requests with different scales share ControlNet batches: the scale is a per-item input.
    assert executions - executions_before < inferences - inferences_before
    for payload, data in zip(payloads, served, strict=True):
        sequential = local_pipeline(ImageRequest(**payload)).pixels
        diff = np.abs(read_pixels(data).astype(np.int16) - sequential.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 60)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_IMAGES = {
    "not an image": b"GIF89a not a png",
    "bmp": (lambda b: (Image.new("RGB", (8, 8)).save(b, "BMP"), b.getvalue())[1])(io.BytesIO()),
    "truncated png": _png(64, 64)[:60],
    "header bomb": with_size(_png(16, 16), 60000, 60000),
    "over 8 MiB": b"\x89PNG\r\n\x1a\n" + bytes(8 * 2**20),
}


@pytest.mark.parametrize("data", BAD_IMAGES.values(), ids=list(BAD_IMAGES))
def test_a_bad_control_image_is_invalid_argument_and_the_server_keeps_serving(server, data: bytes) -> None:
    image = base64.b64encode(data).decode()
    payload = {**ROBIN, "control": {"depth": {"template": "perched"}, "openpose": {"image": image}}}
    with pytest.raises(InferenceServerException) as caught:
        raw_infer(server.grpc_url, json.dumps(payload))
    assert "INVALID_ARGUMENT" in str(caught.value.status())
    assert "'control.openpose.image'" in caught.value.message() and "PNG" in caught.value.message()
    picture, metadata = raw_infer(server.grpc_url, json.dumps({**ROBIN, "seed": 5}))
    assert picture[:8] == b"\x89PNG\r\n\x1a\n" and metadata["seed"] == 5


def test_a_kind_the_export_lacks_is_refused_naming_it() -> None:
    request = ImageRequest(**{**ROBIN, "control": {"depth": {"template": "perched"}}})
    with pytest.raises(RequestError) as caught:
        prepare_controls(request, exported=["openpose"])
    assert caught.value.field == "control.depth" and "openpose" in caught.value.allowed
    assert prepare_controls(ImageRequest(**ROBIN), exported=[]) == []
