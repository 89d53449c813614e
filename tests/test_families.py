"""Family LoRAs end to end: fused per-family UNets, routing, on-demand loading, hot swap, bad LoRAs."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from birdgen.client import BirdClient
from birdgen.export.exporter import export_repository
from birdgen.export.lora import LoraError
from birdgen.manifest import core_models, verify_manifest
from birdgen.server import TritonServer
from tests.conftest import EXPORT_OPTIONS, ROBIN
from tests.loras import random_lora
from tests.test_animation import CLIP, animatediff_sdxl, reference_clip
from tests.test_parity import assert_close_to_reference, diffusers_image

pytestmark = pytest.mark.triton
# One instance per entry model: these tests start a server, roll out and reload entries several
# times, and a python-backend instance costs ~2.3 s to start on 2 cores; none needs concurrency.
FAMILY_OPTIONS = {**EXPORT_OPTIONS, "entry_instances": 1}
UNKNOWN = {**ROBIN, "species": "Dodo", "scientific_name": "Raphus cucullatus", "species_id": None}


@pytest.fixture(scope="module")
def loras(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: random_lora(tiny_model, root / name, seed=seed) for name, seed in (("a", 1), ("b", 2))}


@pytest.fixture(scope="module")
def family_repo(repository: Path, tiny_model: Path, loras: dict[str, Path], tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("families") / "model_repository"
    shutil.copytree(repository, repo)
    manifest = export_repository(
        tiny_model, repo, **FAMILY_OPTIONS, loras={"passeriformes": loras["a"]}, progress=lambda _: None
    )
    assert manifest["families"]["Passeriformes"]["version"] == 1
    assert manifest["families"]["Passeriformes"]["motion"]["model"] == "motion_unet_passeriformes"
    return repo


@pytest.fixture(scope="module")
def explicit_server(family_repo: Path) -> Iterator[TritonServer]:
    with TritonServer(family_repo, model_control="explicit", load_models=core_models(family_repo)) as server:
        yield server


def export_family(
    tiny_model: Path, repo: Path, lora: Path, progress: Callable[[str], None] = lambda _: None
) -> dict:
    """Passeriformes' LoRA exported into `repo` (a copy of the shared repository, kept as it is)."""
    return export_repository(
        tiny_model, repo, **FAMILY_OPTIONS, loras={"Passeriformes": lora}, progress=progress
    )


def model_state(client: BirdClient, name: str) -> set[tuple[str, str]]:
    return {(m["version"], m["state"]) for m in client.list_models() if m["name"] == name}


def test_family_unet_loads_on_demand_and_matches_diffusers_with_the_lora_fused(
    explicit_server, tiny_model: Path, loras: dict[str, Path]
) -> None:
    from diffusers import StableDiffusionXLPipeline

    with BirdClient(explicit_server.grpc_url) as client:
        assert ("1", "READY") not in model_state(client, "unet_passeriformes")
        served = client.generate_image(**ROBIN)
        assert ("1", "READY") in model_state(client, "unet_passeriformes")
    meta = served.metadata
    assert meta["family"] == "Passeriformes" and meta["family_source"] == "catalogue"
    assert meta["unet"] == {"model": "unet_passeriformes", "version": 1}
    assert meta["lora"]["family"] == "Passeriformes" and meta["lora"]["rank"] == 4

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    base = diffusers_image(pipe, meta, meta["seed"])
    pipe.load_lora_weights(str(loras["a"]))
    pipe.fuse_lora()
    pixels = np.asarray(served.image.convert("RGB"))
    assert_close_to_reference(pixels, diffusers_image(pipe, meta, meta["seed"]))
    assert np.abs(pixels.astype(np.int16) - base.astype(np.int16)).mean() > 5  # the LoRA really acts


def test_a_controlled_family_request_draws_on_the_family_controlled_unet_loaded_on_demand(
    explicit_server, tiny_model: Path, loras: dict[str, Path], reference_pipeline
) -> None:
    """The family's LoRA reaches controlled requests too: its `controlled_unet_<family>` (derived at
    export like the family UNet) and the ControlNet stage load on first use, and the image equals
    diffusers' ControlNet pipeline with the LoRA fused."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from birdgen.control_templates import render_template

    control = {"openpose": {"template": "perched"}}
    with BirdClient(explicit_server.grpc_url) as client:
        assert ("1", "READY") not in model_state(client, "controlnet_openpose")
        served = client.generate_image(**{**ROBIN, "control": control})
        assert ("1", "READY") in model_state(client, "controlnet_openpose")
        assert ("1", "READY") in model_state(client, "controlled_unet_passeriformes")
    meta = served.metadata
    assert meta["unet"] == {"model": "controlled_unet_passeriformes", "version": 1}
    assert meta["lora"]["family"] == "Passeriformes"
    net = ControlNetModel.from_pretrained(tiny_model / "controlnet-openpose")
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_model, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(loras["a"]))
    pipe.fuse_lora()
    image = pipe(
        meta["prompt"],
        image=render_template("openpose", "perched", meta["width"], meta["height"]),
        controlnet_conditioning_scale=0.8,
        num_inference_steps=meta["steps"],
        guidance_scale=0.0,
        width=meta["width"],
        height=meta["height"],
        generator=torch.Generator("cpu").manual_seed(meta["seed"]),
    ).images[0]
    assert_close_to_reference(np.asarray(served.image.convert("RGB")), np.asarray(image))


# diffusers' load_lora_weights on the motion UNet: the LoRA's target names (to_q, ...) also match the
# motion modules' layers, which a 2-D UNet LoRA has no weights for; peft warns, nothing is wrong.
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_family_clip_draws_on_the_family_motion_unet_and_matches_diffusers(
    explicit_server, family_repo: Path, tiny_model: Path, loras: dict[str, Path]
) -> None:
    from birdgen.ensemble.animation import AnimationPipeline
    from birdgen.ensemble.runners import LocalRunner
    from birdgen.schema import AnimationRequest

    request = {**CLIP, "steps": 1, "format": "webp", "poster_frame": 3}
    with BirdClient(explicit_server.grpc_url) as client:
        served = client.generate_animation(**request)
    meta = served.metadata
    assert meta["unet"] == {"model": "motion_unet_passeriformes", "version": 1}
    assert meta["family"] == "Passeriformes" and meta["lora"]["family"] == "Passeriformes"

    entry = max(
        (p for p in (family_repo / "bird_animation").iterdir() if p.is_dir()), key=lambda p: int(p.name)
    )
    local = AnimationPipeline(entry, LocalRunner(family_repo))(AnimationRequest(**request))
    assert served.files == local.files
    pipe = animatediff_sdxl(tiny_model)
    pipe.load_lora_weights(str(loras["a"]))
    pipe.fuse_lora()
    assert_close_to_reference(local.frames, reference_clip(pipe, local, 1, 16))


def test_routing_unknown_species_and_families_without_a_lora_use_the_base(
    explicit_server, local_pipeline
) -> None:
    from birdgen.schema import ImageRequest

    with BirdClient(explicit_server.grpc_url) as client:
        unknown = client.generate_image(**UNKNOWN)
        mallard = client.generate_image(
            **{
                **ROBIN,
                "species": "Mallard",
                "scientific_name": "Anas platyrhynchos",
                "species_id": "mallar3",
            }
        )
        explicit = client.generate_image(**{**UNKNOWN, "family": "passeriformes"})
    assert unknown.metadata["unet"]["model"] == "unet" and unknown.metadata["family_source"] == "unknown"
    assert unknown.metadata["family"] is None and unknown.metadata["lora"] is None
    assert mallard.metadata["family"] == "Anseriformes" and mallard.metadata["unet"]["model"] == "unet"
    assert explicit.metadata["family_source"] == "request"
    assert explicit.metadata["unet"]["model"] == "unet_passeriformes"
    # The base UNet is unchanged by the family export: same bytes as the base-only repository.
    assert unknown.data == local_pipeline(ImageRequest(**UNKNOWN)).data


def test_hot_swap_drops_no_request_and_later_requests_use_the_new_version(
    explicit_server, family_repo: Path, tiny_model: Path, loras: dict[str, Path]
) -> None:
    with BirdClient(explicit_server.grpc_url) as client:
        before = client.generate_image(**{**ROBIN, "seed": 5})
    assert before.metadata["unet"]["version"] == 1

    failures: list[BaseException] = []
    versions: list[int] = []
    stop = threading.Event()
    answered = threading.Condition()

    def stream(worker: int) -> None:
        with BirdClient(explicit_server.grpc_url) as client:
            for i in range(1000):  # bounded: until `stop`, at most 1000 requests per worker
                if stop.is_set():
                    return
                try:
                    image = client.generate_image(**{**ROBIN, "seed": 1000 * worker + i})
                except BaseException as exc:
                    failures.append(exc)
                    continue
                with answered:
                    versions.append(image.metadata["unet"]["version"])
                    answered.notify_all()

    def wait_for_answers(done: Callable[[], bool]) -> None:
        with answered:
            assert answered.wait_for(lambda: done() or bool(failures), timeout=300), versions

    manifest = export_repository(
        tiny_model,
        family_repo,
        **FAMILY_OPTIONS,
        loras={"Passeriformes": loras["b"]},
        progress=lambda _: None,
    )
    assert manifest["families"]["Passeriformes"]["version"] == 2
    workers = [threading.Thread(target=stream, args=(w,)) for w in range(3)]
    for worker in workers:
        worker.start()
    wait_for_answers(lambda: len(versions) >= len(workers))  # traffic flows before the roll-out
    with BirdClient(explicit_server.grpc_url) as client:
        client.roll_out("unet_passeriformes")  # returns once version 2 and the new entries serve
        after = client.generate_image(**{**ROBIN, "seed": 5})
        clip = client.generate_animation(**{**CLIP, "steps": 1, "format": "webp"})
        posed = client.generate_image(**{**ROBIN, "seed": 5, "control": {"depth": {"template": "perched"}}})
    wait_for_answers(lambda: 2 in versions)  # and goes on to the new version after it
    stop.set()
    for worker in workers:
        worker.join(timeout=120)
    assert failures == []
    assert set(versions) <= {1, 2} and 2 in versions
    assert (
        after.metadata["unet"]["version"] == 2
        and after.metadata["lora"]["sha256"] != before.metadata["lora"]["sha256"]
    )
    assert after.data != before.data
    assert clip.metadata["unet"] == {"model": "motion_unet_passeriformes", "version": 2}
    assert clip.metadata["lora"]["sha256"] == after.metadata["lora"]["sha256"]
    # A controlled UNet loaded before the roll-out is rolled out with it; one that was not loads its newest.
    assert posed.metadata["unet"] == {"model": "controlled_unet_passeriformes", "version": 2}
    assert verify_manifest(family_repo) == []

    # A third version prunes the first (the served one and the one before stay); an unchanged LoRA is skipped.
    export_repository(
        tiny_model,
        family_repo,
        **FAMILY_OPTIONS,
        loras={"Passeriformes": loras["a"]},
        progress=lambda _: None,
    )
    for model in ("unet_passeriformes", "motion_unet_passeriformes"):
        assert sorted(p.name for p in (family_repo / model).iterdir() if p.is_dir()) == ["2", "3"]
    messages: list[str] = []
    export_repository(
        tiny_model,
        family_repo,
        **FAMILY_OPTIONS,
        loras={"Passeriformes": loras["a"]},
        progress=messages.append,
    )
    for model in ("unet_passeriformes", "motion_unet_passeriformes"):
        assert f"{model}: up to date (version 3), skipped" in messages


def snapshot(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


def corrupt(lora: Path, out: Path, change) -> Path:
    state = load_file(lora / "pytorch_lora_weights.safetensors")
    out.mkdir(parents=True)
    save_file(change(state), out / "pytorch_lora_weights.safetensors")
    return out


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("unknown family", "allowed: .*Passeriformes"),
        ("wrong shape", "lora_B has shape"),
        ("other base model", "not a module of this UNet"),
        ("missing file", "LoRA not found"),
    ],
)
def test_bad_lora_fails_export_and_writes_nothing(
    case, match, tiny_model: Path, repository: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    before = snapshot(repo)
    family, lora = "Passeriformes", loras["a"]
    if case == "unknown family":
        family = "Dinosauria"
    elif case == "wrong shape":

        def widen(state):
            key = next(k for k in state if k.endswith("to_k.lora.up.weight"))
            return {**state, key: torch.zeros(state[key].shape[0] + 3, state[key].shape[1])}

        lora = corrupt(lora, tmp_path / "wide", widen)
    elif case == "other base model":
        lora = corrupt(
            lora,
            tmp_path / "other",
            lambda s: {k.replace("down_blocks.1", "down_blocks.7"): v for k, v in s.items()},
        )
    else:
        lora = tmp_path / "nowhere"
    with pytest.raises((LoraError, ValueError), match=match):
        export_repository(tiny_model, repo, **FAMILY_OPTIONS, loras={family: lora}, progress=lambda _: None)
    assert snapshot(repo) == before
    assert not list(repo.parent.glob(".unet_*"))


def ready(model: str, listing: str) -> bool:
    return any(line.split()[:1] == [model] and "READY" in line for line in listing.splitlines())


def test_models_command_lists_and_loads(explicit_server) -> None:
    from tests.test_cli import run

    done = run("models", "unload", "unet_passeriformes", "--url", explicit_server.grpc_url)
    assert done.returncode == 0, done.stderr
    listing = run("models", "list", "--url", explicit_server.grpc_url).stdout
    assert "unet_passeriformes" in listing and "READY" in listing  # the other models still serve
    assert not ready("unet_passeriformes", listing)
    done = run("models", "load", "unet_passeriformes", "--url", explicit_server.grpc_url)
    assert done.returncode == 0, done.stderr
    assert ready("unet_passeriformes", done.stdout) and ready("motion_unet_passeriformes", done.stdout)
    missing = run("models", "load", "--url", explicit_server.grpc_url)
    assert missing.returncode == 2 and "needs a model name" in missing.stderr


def test_fusing_honours_alpha_like_diffusers(tiny_model: Path, tmp_path: Path) -> None:
    """alpha != rank scales the LoRA by alpha/rank; the fused UNet must match diffusers' fuse_lora."""
    from diffusers import StableDiffusionXLPipeline

    from birdgen.export.lora import fused_unet

    lora = random_lora(tiny_model, tmp_path / "alpha", rank=4, alpha=8, seed=3)
    fused = fused_unet(tiny_model, lora, "Passeriformes")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    torch.manual_seed(0)
    args = (torch.randn(1, 4, 32, 32), torch.tensor([500.0]), torch.randn(1, 77, 80))
    added = {"text_embeds": torch.randn(1, 40), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():
        base = pipe.unet(*args, added_cond_kwargs=added).sample
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
        want = pipe.unet(*args, added_cond_kwargs=added).sample
        got = fused(*args, added_cond_kwargs=added).sample
    assert (got - want).abs().max() < 1e-5 < (want - base).abs().max()
