"""Shared fixtures: one tiny model, one exported repository and one Triton server for the whole run.

Built once per session (export ~30 s, server start a few seconds on 2 cores); tests that need a fresh
server start their own on free ports.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from birdgen.cli import DEMO_REQUEST
from birdgen.server import TritonServer

# The demo request at 256 px: the same real path, four times cheaper on CPU.
ROBIN = {**DEMO_REQUEST, "width": 256, "height": 256}
# The same bird as a clip: a behaviour instead of the pose, the animation's own format and steps.
CLIP = {k: v for k, v in ROBIN.items() if k not in ("pose", "format", "steps")} | {"behaviour": "flying"}
# Three instances per entry model: while one request's UNet call runs, the other two queue, so
# concurrent requests share UNet batches (measured under a CPU hog: 19-23 executions for 32 UNet
# inferences; with two instances the calls alternate and rarely batch, 28-31). Each instance is a
# python-backend process (~2.3 s to start, ~1 s to stop on 2 cores) paid at every server start and
# roll-out of the suite, so no more than that (the export's default is four).
ENTRY_INSTANCES = 3
# The shared repository's export options; a test that exports into a copy of it passes them again,
# or the export rewrites the entries with its defaults (four instances, the request's frame limit).
# A deployment cap below the request limit, so the tests see one (see test_animation_serving).
# Two export processes: the motion UNet's trace beside the other stages (~40 s less on 2 cores).
EXPORT_OPTIONS = {"max_frames": 96, "entry_instances": ENTRY_INSTANCES, "jobs": 2}
# Only what an image needs: a server that starts without the animation entries and the motion UNet.
IMAGE_MODELS = ("bird_image", "text_encoder", "text_encoder_2", "unet", "vae_decoder")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from birdgen.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-sdxl-turbo")


@pytest.fixture(scope="session")
def repository(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from birdgen.export.exporter import export_repository

    repo = tmp_path_factory.mktemp("repo") / "model_repository"
    export_repository(tiny_model, repo, **EXPORT_OPTIONS, progress=lambda _: None)
    return repo


@pytest.fixture(scope="session")
def server(repository: Path) -> Iterator[TritonServer]:
    with TritonServer(repository) as running:
        yield running


@pytest.fixture(scope="session")
def local_pipeline(repository: Path):  # type: ignore[no-untyped-def]
    """The same pipeline and engines, in-process: the sequential reference for served results."""
    from birdgen.ensemble.pipeline import ImagePipeline
    from birdgen.ensemble.runners import LocalRunner

    return ImagePipeline(repository / "bird_image" / "1", LocalRunner(repository))


@pytest.fixture(scope="session")
def reference_pipeline(tiny_model: Path):  # type: ignore[no-untyped-def]
    """diffusers' own StableDiffusionXLPipeline on the same folder: the ground truth."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def animation_pipeline(repository: Path):  # type: ignore[no-untyped-def]
    from birdgen.ensemble.animation import AnimationPipeline
    from birdgen.ensemble.runners import LocalRunner

    return AnimationPipeline(repository / "bird_image" / "1", LocalRunner(repository))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server for one test module; the module's gateways share it, as replicas would."""
    from tests.redis_fixture import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as redis_server:
        yield redis_server.url


@pytest.fixture(scope="module")
def gateway(server: TritonServer, redis_url: str, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One `birdgen gateway` process for a test module, on the session's Triton and `redis_url`."""
    from tests.gateway_process import running_gateway

    with running_gateway(server.grpc_url, redis_url, tmp_path_factory.mktemp("gateway")) as running:
        yield running
