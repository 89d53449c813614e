"""bird_animation through Triton: same bytes as the in-process pipeline, bad input, client and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from birdgen.client import BirdClient, InvalidRequestError
from birdgen.media import read_animation, read_metadata
from birdgen.schema import AnimationRequest
from tests.conftest import CLIP
from tests.test_cli import run

pytestmark = pytest.mark.triton


def raw_animation(url: str, payload: dict) -> dict[str, bytes]:
    tensor = grpcclient.InferInput("request", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([json.dumps(payload).encode()], dtype=np.object_))
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer("bird_animation", [tensor])
    return {name: result.as_numpy(name)[0] for name in ("webp", "gif", "poster", "metadata")}


def test_served_clip_equals_the_in_process_pipeline(server, animation_pipeline) -> None:
    request = {**CLIP, "steps": 2, "format": "both"}
    with BirdClient(server.grpc_url) as client:
        served = client.generate_animation(**request)
    local = animation_pipeline(AnimationRequest(**request))
    assert served.files == local.files  # and the in-process clip matches diffusers (test_animation)
    assert served.metadata["frames"] == 16 and served.metadata["unet"]["model"] == "motion_unet"


def test_served_long_clip_uses_context_windows_as_in_process(server, animation_pipeline) -> None:
    """18 frames: a window at 0 and a tail window at 2, through BLS and the motion UNet engine."""
    request = {**CLIP, "steps": 1, "duration_seconds": 2, "fps": 9, "format": "webp"}
    with BirdClient(server.grpc_url) as client:
        served = client.generate_animation(**request)
    assert served.files == animation_pipeline(AnimationRequest(**request)).files
    assert read_animation(served.files["webp"]).frame_count == served.metadata["frames"] == 18


def test_only_the_asked_format_comes_back(server) -> None:
    with BirdClient(server.grpc_url) as client:
        clip = client.generate_animation(**{**CLIP, "steps": 1, "format": "gif", "fps": 10})
    assert set(clip.files) == {"gif", "poster"}
    info = read_animation(clip.files["gif"])
    assert info.frame_count == 20 and abs(info.total_ms - 2000) <= 10


@pytest.mark.parametrize(
    ("change", "field", "hint"),
    [
        ({"duration_seconds": 7}, "duration_seconds", "2..5"),
        ({"fps": 30}, "fps", "8..24"),
        ({"behaviour": "moonwalking"}, "behaviour", "flying"),
        ({"duration_seconds": 5, "fps": 24}, "duration_seconds", "at most 96 frames"),
        ({"poster_frame": 16}, "poster_frame", "0..15"),
    ],
)
def test_bad_animation_request_names_the_field_and_server_keeps_serving(server, change, field, hint) -> None:
    with pytest.raises(InferenceServerException) as caught:
        raw_animation(server.grpc_url, {**CLIP, **change})
    assert "INVALID_ARGUMENT" in str(caught.value.status())
    assert repr(field) in caught.value.message() and hint in caught.value.message()
    good = raw_animation(server.grpc_url, {**CLIP, "steps": 1, "format": "webp"})
    assert good["webp"][:4] == b"RIFF" and good["gif"] == b""


def test_client_validates_animation_before_sending() -> None:
    from birdgen.server import free_port

    with BirdClient(f"127.0.0.1:{free_port()}", deadline_s=5) as client, pytest.raises(InvalidRequestError):
        client.generate_animation(**{**CLIP, "fps": 99})


def test_cli_generate_animation_writes_webp_gif_and_poster(server, tmp_path: Path) -> None:
    out, gif, poster = tmp_path / "robin.webp", tmp_path / "robin.gif", tmp_path / "robin.png"
    args = ["generate", "animation", "--url", server.grpc_url, "--species", "American Robin"]
    args += ["--behaviour", "singing", "--width", "256", "--height", "256", "--steps", "1", "--seed", "3"]
    done = run(*args, "--out", str(out), "--gif", str(gif), "--poster", str(poster))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["behaviour"] == "singing"
    assert (
        read_animation(out.read_bytes()).format == "webp" and read_animation(gif.read_bytes()).format == "gif"
    )
    assert read_metadata(poster.read_bytes())["seed"] == 3


def test_progress_streams_step_by_step_then_the_same_clip(server) -> None:
    request = {**CLIP, "steps": 3, "format": "webp"}
    messages: list[dict] = []
    with BirdClient(server.grpc_url) as client:
        streamed = client.generate_animation(**request, on_progress=messages.append)
        plain = client.generate_animation(**request)
    denoise = [(m["done"], m["total"]) for m in messages if m["stage"] == "denoise"]
    decode = [(m["done"], m["total"]) for m in messages if m["stage"] == "decode"]
    assert denoise == [(1, 3), (2, 3), (3, 3)]
    assert decode[-1] == (16, 16) and [d for d, _ in decode] == sorted(d for d, _ in decode)
    assert streamed.files == plain.files


def test_stream_reports_bad_input_as_invalid_request(server) -> None:
    with BirdClient(server.grpc_url) as client, pytest.raises(InvalidRequestError, match="duration_seconds"):
        # Valid for the client's schema (120 frames), too long for this server's motion adapter (32).
        client.generate_animation(**{**CLIP, "duration_seconds": 5, "fps": 24}, on_progress=lambda _: None)
