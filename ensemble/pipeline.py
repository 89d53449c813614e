"""The SDXL-Turbo image pipeline as birdgen runs it: StableDiffusionXLPipeline's algorithm, stage by stage,
with every model call going through a `StageRunner` (Triton BLS in the server, engines in-process in
tests) instead of a torch module.

It reproduces the diffusers pipeline at guidance 0: the same tokenization, the penultimate CLIP hidden
states, the same added time ids, diffusers' own EulerAncestralDiscreteScheduler, and a CPU
`torch.Generator` drawing the initial latents and each step's noise in the same order, so the same
seed gives the same image. Only the scheduler math runs here; the heavy models run in their engines.

The loop works where the stages answer: the text encoders' outputs fix the request's device, the
latents are drawn there (the CPU generator's noise moved over, as diffusers' `randn_tensor` does),
and the scheduler steps there, so on a GPU no latent, noise prediction or embedding crosses to the
host between stages; only the decoded picture does, to be encoded.
"""

from __future__ import annotations

import copy
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

import birdgen
from birdgen.catalogue import Catalogue
from birdgen.contracts import BASE_UNET, CONTROLLED_UNET, PIPELINE_FILE, controlnet_model
from birdgen.eink import render_request
from birdgen.ensemble.controlnet import ActiveControl, control_metadata, prepare_controls, residual_function
from birdgen.ensemble.routing import FamilyRouter, UnetChoice
from birdgen.ensemble.runners import ModelUnavailable
from birdgen.media import encode_image
from birdgen.model_folder import ModelDims
from birdgen.prompt_tokenizer import PromptTokenizer
from birdgen.prompts import Prompt, PromptLibrary
from birdgen.schema import EINK, ImageRequest, RequestError

# How often a request is redrawn when a roll-out unloads the UNet version it was pinned to.
ROLLOUT_ATTEMPTS = 3
# Prompt embeddings kept per pipeline (per entry model instance): ~100 prompts of real SDXL (630 KB each).
PROMPT_CACHE_BYTES = 64 * 2**20
Tensors = dict[str, torch.Tensor]
T = TypeVar("T")
Embeddings = tuple[torch.Tensor, torch.Tensor, bool]  # prompt embeds, pooled embeds, prompt truncated


class PromptEmbeddingCache:
    """Both text encoders' outputs per prompt text, least recently used out first, bounded in bytes.

    Why: a species' prompt is the same for every seed, and the encoders are a pure function of it
    (for one entry model version, which fixes tokenizers and engines). A hit makes no stage call at
    all: on the 2-core machine that is the two BLS calls' 3.4 ms even when Triton's response cache
    answers them, and on a GPU, where that cache does not apply, both encoders' compute too.
    The tensors stay on their device (GPU memory on a GPU) and are shared by every request of the
    prompt: the pipeline only reads them, never changes them in place.
    """

    def __init__(self, max_bytes: int = PROMPT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Embeddings] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def _size(value: Embeddings) -> int:
        return sum(t.numel() * t.element_size() for t in value[:2])

    def get(self, text: str) -> Embeddings | None:
        value = self.entries.get(text)
        if value is not None:
            self.entries.move_to_end(text)
        return value

    def put(self, text: str, value: Embeddings) -> None:
        if text in self.entries:
            self.bytes -= self._size(self.entries.pop(text))
        self.entries[text] = value
        self.bytes += self._size(value)
        while self.bytes > self.max_bytes and self.entries:
            self.bytes -= self._size(self.entries.popitem(last=False)[1])


class StageRunner(Protocol):
    """Runs engine stages by name; `run_many` may run independent calls concurrently.

    `model`/`version` name another model serving the stage's contract (a family UNet) and pin its
    version; `ready_version` picks the newest ready one of `versions`, loading the model if needed.
    """

    def ready_version(self, model: str, versions: Sequence[int]) -> int: ...

    def max_batch(self, stage: str) -> int: ...

    def run(
        self, stage: str, inputs: Mapping[str, torch.Tensor], model: str | None = None, version: int = ...
    ) -> Tensors: ...

    def run_many(self, calls: Sequence[tuple[str, Mapping[str, torch.Tensor]]]) -> list[Tensors]: ...


@dataclass
class ImageResult:
    data: bytes  # the encoded image; with format eink, the PNG preview
    format: str  # of `data`: png for an e-ink result
    metadata: dict[str, Any]
    pixels: np.ndarray = field(repr=False)  # the decoded picture, before any e-ink rendering
    eink_buffer: bytes = b""  # format eink: the panel driver's packed buffer (birdgen.eink)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class TimedRunner:
    """A StageRunner that adds up the wall time of its stage calls.

    Why: the response metadata splits a request's time into the entry's own work (prompt, scheduler,
    encoding) and the time spent in stage models, so the benchmark can tell Triton's overhead from
    compute. One request at a time per pipeline (a Triton instance runs one `execute` at a time).
    """

    def __init__(self, runner: StageRunner) -> None:
        self.runner = runner
        self.ms = 0.0

    def ready_version(self, model: str, versions: Sequence[int]) -> int:
        return self.runner.ready_version(model, versions)

    def max_batch(self, stage: str) -> int:
        return self.runner.max_batch(stage)

    def run(self, stage: str, inputs: Mapping[str, torch.Tensor], **where: Any) -> Tensors:
        start = time.perf_counter()
        try:
            return self.runner.run(stage, inputs, **where)
        finally:
            self.ms += _ms_since(start)

    def run_many(self, calls: Sequence[tuple[str, Mapping[str, torch.Tensor]]]) -> list[Tensors]:
        start = time.perf_counter()
        try:
            return self.runner.run_many(calls)
        finally:
            self.ms += _ms_since(start)


@dataclass
class Timings:
    """Per-stage wall times of one request, then `stage_calls` and `total` (see `finish`)."""

    runner: TimedRunner
    ms: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.runner.ms = 0.0

    @contextmanager
    def stage(self, name: str):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        yield
        self.ms[name] = round(self.ms.get(name, 0.0) + _ms_since(start), 3)

    def finish(self) -> dict[str, float]:
        """The stage times plus `total` (the request inside this model) and `stage_calls` (the part of
        it spent waiting for stage models); total - stage_calls is the entry's own work."""
        return {
            **self.ms,
            "stage_calls": round(self.runner.ms, 3),
            "total": round(_ms_since(self.started), 3),
        }


class ImagePipeline:
    """Text -> image through the stage runner; built from the entry model's folder (see export)."""

    def __init__(
        self,
        bundle_dir: Path,
        runner: StageRunner,
        prompts: PromptLibrary | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        """`info`: the folder's pipeline.json when the caller has read it already (the entry models)."""
        bundle_dir = Path(bundle_dir)
        info = self.info = info or json.loads((bundle_dir / PIPELINE_FILE).read_text())
        self.model_version: str = info["model_version"]
        self.dims = ModelDims.from_dict(info["dims"])
        self.controlnets: list[str] = info.get("controlnets", [])  # the kinds the export has
        self.prompt_tokenizer = PromptTokenizer.from_folder(bundle_dir)
        # Built once and copied per request: from_config inspects signatures (~1.5 ms a request).
        self.scheduler = EulerAncestralDiscreteScheduler.from_config(
            EulerAncestralDiscreteScheduler.load_config(bundle_dir / "scheduler")
        )
        self.runner = TimedRunner(runner)
        self.prompt_embeddings = PromptEmbeddingCache()
        self.prompts = prompts or PromptLibrary.load()
        # bundle_dir is <repository>/bird_image/<version>
        self.router = FamilyRouter(bundle_dir.resolve().parent.parent, Catalogue.load())

    # -- the algorithm, in the order StableDiffusionXLPipeline.__call__ runs it ------------------------
    def __call__(self, request: ImageRequest) -> ImageResult:
        timings = Timings(self.runner)
        # format=eink draws the PNG of the same request and renders that for the panel, exactly as a
        # client renders the PNG it finds in its cache (birdgen.eink.render_request).
        picture = request.eink_source() if request.format == EINK else request
        self.check_inputs(picture)
        # Control pictures are decoded (and bad ones refused) before any stage call.
        control = picture.control_settings()  # resolved once: the stage pictures and the metadata
        controls = prepare_controls(picture, self.controlnets, control)
        prompt = self.prompts.build(picture)
        seed = picture.resolved_seed()
        choice = self.router.choose(picture, base=CONTROLLED_UNET if controls else BASE_UNET)
        with timings.stage("text_encoders"):
            prompt_embeds, pooled, truncated = self.encode_prompt(prompt.text)
        with timings.stage("unet"):
            latents, version = self.on_one_version(
                choice,
                lambda model, v: self.denoise(
                    picture, seed, prompt_embeds, pooled, model, v, controls, timings
                ),
            )
        with timings.stage("vae_decoder"):
            pixels = self.runner.run("vae_decoder", {"latent": latents})["image"][0].cpu().numpy()
        metadata = self.describe(picture, prompt, seed, truncated)
        metadata.update(self.unet_facts(choice, version))
        if picture.control is not None:
            metadata["control"] = control_metadata(control, picture.steps)
        with timings.stage("encode"):
            data = encode_image(pixels, picture.format, metadata)
        buffer = b""
        if picture is not request:
            with timings.stage("eink"):
                panel = render_request(request, data)
            data, metadata, buffer = panel.preview_png, panel.metadata, panel.buffer
        # Timings vary run to run, so they go in the response metadata but not into the file: the same
        # request must give the same bytes.
        return ImageResult(data, picture.format, {**metadata, "timings_ms": timings.finish()}, pixels, buffer)

    def on_one_version(self, choice: UnetChoice, denoise: Callable[[str, int], T]) -> tuple[T, int]:
        """`denoise(model, version)` on the newest ready version of the chosen UNet, and that version.

        If a roll-out unloads the version mid-request, the whole loop runs again on the new one
        rather than mixing two versions' steps in one picture.
        """
        attempts_left = ROLLOUT_ATTEMPTS
        while True:
            version = self.runner.ready_version(choice.model, self.router.versions(choice.model))
            try:
                return denoise(choice.model, version), version
            except ModelUnavailable:
                attempts_left -= 1
                if not attempts_left:
                    raise

    def unet_facts(self, choice: UnetChoice, version: int) -> dict[str, Any]:
        """Which family and which UNet (and LoRA) drew it, for the metadata."""
        return {
            "family": choice.family,
            "family_source": choice.family_source,
            "unet": {"model": choice.model, "version": version},
            "lora": self.router.lora(choice.model, version),
        }

    def new_scheduler(self, steps: int, device: torch.device) -> EulerAncestralDiscreteScheduler:
        """A fresh scheduler for one request's `steps` on `device` (schedulers keep per-run state)."""
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(steps, device=device)
        scheduler.set_begin_index(0)
        return scheduler

    def denoise(
        self,
        request: ImageRequest,
        seed: int,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        unet: str,
        version: int,
        controls: Sequence[ActiveControl] = (),
        timings: Timings | None = None,
    ) -> torch.Tensor:
        """prepare_latents and the Euler-ancestral loop, the generator drawing in the pipeline's order,
        on the device of the prompt embeddings; with `controls`, each step's ControlNet residuals go
        into the controlled UNet `unet`."""
        generator = torch.Generator("cpu").manual_seed(seed)
        device = prompt_embeds.device
        scheduler = self.new_scheduler(request.steps, device)
        latents = self.prepare_latents(
            request.height, request.width, generator, scheduler.init_noise_sigma, device
        )
        conditions = self.unet_conditions(request, prompt_embeds, pooled)
        if not controls:
            return self.run_steps("unet", scheduler, latents, generator, conditions, unet, version)
        for control in controls:  # the ControlNet stages load on first use, like family UNets
            self.runner.ready_version(controlnet_model(control.kind), [1])
        residuals = residual_function(self.runner.run_many, controls, self.dims, device)

        def timed_residuals(step: int, inputs: Tensors) -> Tensors:
            if timings is None:
                return residuals(step, inputs)
            with timings.stage("controlnet"):
                return residuals(step, inputs)

        return self.run_steps(
            CONTROLLED_UNET,
            scheduler,
            latents,
            generator,
            conditions,
            unet,
            version,
            residuals=timed_residuals,
        )

    def run_steps(
        self,
        stage: str,
        scheduler: EulerAncestralDiscreteScheduler,
        latents: torch.Tensor,
        generator: torch.Generator,
        conditions: Tensors,
        model: str,
        version: int,
        progress: Callable[[str, int, int], None] | None = None,
        residuals: Callable[[int, Tensors], Tensors] | None = None,
    ) -> torch.Tensor:
        """The Euler-ancestral loop over `stage` (UNet, motion UNet or controlled UNet) pinned to
        `model`/`version`, with `conditions` the inputs that stay the same every step; `residuals`
        (the controlled UNet's) gives a step's ControlNet residuals from its UNet inputs; `progress`
        hears each step."""
        for step, t in enumerate(scheduler.timesteps, start=1):
            inputs = {
                "sample": scheduler.scale_model_input(latents, t),
                "timestep": t.to(torch.float32).reshape(1, 1),
                **conditions,
            }
            if residuals is not None:
                inputs |= residuals(step - 1, inputs)
            noise_pred = self.runner.run(stage, inputs, model=model, version=version)["noise_pred"]
            latents = scheduler.step(noise_pred, t, latents, generator=generator, return_dict=False)[0]
            if progress:
                progress("denoise", step, len(scheduler.timesteps))
        return latents

    @staticmethod
    def unet_conditions(request: Any, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> Tensors:
        """The UNet inputs that stay the same every step: prompt, pooled prompt and SDXL's time ids
        (original size, crop offset 0, target size), on the embeddings' device."""
        h, w = request.height, request.width
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=prompt_embeds.device)
        return {"encoder_hidden_states": prompt_embeds, "text_embeds": pooled, "time_ids": time_ids}

    def check_inputs(self, request: ImageRequest) -> None:
        stride = self.dims.pixel_stride
        for name in ("width", "height"):
            value = getattr(request, name)
            if value % stride:
                raise RequestError(name, value, f"a multiple of {stride} (this model's pixel stride)")

    def encode_prompt(self, text: str) -> Embeddings:
        """Both CLIP encoders, concurrently: penultimate hidden states concatenated, pooled from the 2nd;
        a prompt seen before by this pipeline comes from its PromptEmbeddingCache."""
        cached = self.prompt_embeddings.get(text)
        if cached is None:
            cached = self._encode_prompt(text)
            self.prompt_embeddings.put(text, cached)
        return cached

    def _encode_prompt(self, text: str) -> Embeddings:
        ids, ids_2 = self.prompt_tokenizer(text)
        truncated = self.prompt_tokenizer.truncated(text)
        out_1, out_2 = self.runner.run_many(
            [("text_encoder", {"input_ids": ids}), ("text_encoder_2", {"input_ids": ids_2})]
        )
        embeds = torch.cat([out_1["hidden_states"], out_2["hidden_states"]], dim=-1)
        # A copy: a BLS output's tensor may be a view of the response's memory (shared memory, or
        # Triton's CUDA pool), which the cache would otherwise keep from being reused.
        return embeds, out_2["text_embeds"].clone(), truncated

    def prepare_latents(
        self,
        height: int,
        width: int,
        generator: torch.Generator,
        sigma: Any,
        device: torch.device,
        frames: int = 0,
    ) -> torch.Tensor:
        """Initial noise: (1, C, h, w) for an image, (1, C, frames, h, w) for a clip, as diffusers draws
        it (on the host from the CPU generator, then moved to `device`)."""
        factor = self.dims.vae_scale_factor
        clip = (frames,) if frames else ()
        shape = (1, self.dims.latent_channels, *clip, height // factor, width // factor)
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32) * sigma

    def describe(self, request: ImageRequest, prompt: Prompt, seed: int, truncated: bool) -> dict[str, Any]:
        """The generation facts that travel with the image (and inside the file)."""
        return {
            "ai_generated": True,
            "generator": f"birdgen {birdgen.__version__}",
            "model_version": self.model_version,
            "species": request.species,
            "scientific_name": request.scientific_name,
            "species_id": request.species_id,
            "prompt": prompt.text,
            "negative_prompt": prompt.negative,
            "prompt_truncated": truncated,
            "seed": seed,
            "seed_derived": request.seed is None,
            "steps": request.steps,
            "guidance_scale": 0.0,
            "scheduler": "EulerAncestralDiscreteScheduler (trailing)",
            "width": request.width,
            "height": request.height,
            "format": request.format,
            "request": json.loads(request.canonical_json()),
        }
