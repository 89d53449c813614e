"""AnimateDiff clips: AnimateDiffSDXLPipeline's algorithm over birdgen's stage runner.

Shares everything but the denoising loop and the decode with the image pipeline: tokenizers, both
text encoders, the prompt library, the scheduler config and the seed rules. The loop runs the
motion UNet stage on the whole clip (1, C, frames, h, w); the scheduler and the generator work on
that 5-D tensor exactly as the diffusers pipeline does, so the same seed draws the same noise.
Clips longer than the motion module's 16-frame window use FreeNoise (birdgen/free_noise.py):
context windows inside the motion UNet and shuffled initial noise. The VAE decodes frames in
chunks of its batch size, so memory stays bounded however long the clip.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import birdgen
from birdgen.contracts import MOTION_UNET
from birdgen.ensemble.pipeline import ImagePipeline, StageRunner, Timings
from birdgen.ensemble.svd import SvdLoop, SvdSettings
from birdgen.free_noise import context_windows, shuffle_context_noise
from birdgen.input_image import decode_input_image_base64
from birdgen.media import encode_animation, encode_poster
from birdgen.request_error import RequestError
from birdgen.stages import CONTEXT_INPUTS

# One thread per file a clip can have (webp, gif, poster), shared by the requests of this process.
ENCODERS = ThreadPoolExecutor(max_workers=3, thread_name_prefix="birdgen-encode")


@dataclass
class AnimationResult:
    files: dict[str, bytes]  # "webp" / "gif" / "poster" (PNG)
    metadata: dict[str, Any]
    frames: np.ndarray = field(repr=False)  # uint8 (frames, H, W, 3)


class AnimationPipeline(ImagePipeline):
    def __init__(
        self, bundle_dir: Path, runner: StageRunner, prompts: Any = None, info: dict[str, Any] | None = None
    ) -> None:
        super().__init__(bundle_dir, runner, prompts, info)
        info = self.info
        # The engines this export has: AnimateDiff with a motion adapter, SVD with an SVD folder.
        self.engines = [
            name
            for name, present in (("animatediff", info.get("motion_max_frames")), ("svd", info.get("svd")))
            if present
        ]
        self.svd = SvdLoop(Path(bundle_dir), self.runner) if info.get("svd") else None

    def __call__(  # type: ignore[override]
        self, request: Any, progress: Callable[[str, int, int], None] | None = None
    ) -> AnimationResult:
        """`progress(stage, done, total)` hears each denoising step and each decoded chunk."""
        if request.engine not in self.engines:
            raise RequestError(
                "engine", request.engine, f"the engines this deployment exported: {', '.join(self.engines)}"
            )
        if request.engine == "svd":
            return self.svd_clip(request, progress)
        timings = Timings(self.runner)
        self.check_inputs(request)
        prompt = self.prompts.build(request)
        seed = request.resolved_seed()
        with timings.stage("text_encoders"):
            prompt_embeds, pooled, truncated = self.encode_prompt(prompt.text)
        choice = self.router.choose(request, base=MOTION_UNET)
        with timings.stage("motion_unet"):
            latents, version = self.on_one_version(
                choice,
                lambda model, v: self.denoise_clip(request, seed, prompt_embeds, pooled, model, v, progress),
            )
        with timings.stage("vae_decoder"):
            frames = self.decode_frames(latents, progress)
        metadata = self.describe(request, prompt, seed, truncated)
        metadata.update(
            behaviour=request.behaviour,
            frames=int(frames.shape[0]),
            fps=request.fps,
            duration_seconds=request.duration_seconds,
            poster_frame=request.poster_frame,
            **self.unet_facts(choice, version),
        )
        with timings.stage("encode"):
            files = self.encode_files(request, frames, metadata)
        return AnimationResult(files, {**metadata, "timings_ms": timings.finish()}, frames)

    def svd_clip(
        self, request: Any, progress: Callable[[str, int, int], None] | None = None
    ) -> AnimationResult:
        """A Stable Video Diffusion clip of the client's picture, or of the still this request's
        structured fields draw (the image entry's bytes for that request: same pipeline, same seed)."""
        assert self.svd is not None
        timings = Timings(self.runner)
        self.check_inputs(request)
        still = None
        if request.image is not None:
            picture = decode_input_image_base64(request.image.text, "image")  # the encoder needs its own size
        else:
            with timings.stage("still"):
                still = ImagePipeline.__call__(self, request.still_request())
            picture = Image.fromarray(still.pixels)
        seed = request.resolved_seed()
        settings = SvdSettings.of(request)
        frames = self.svd(picture, settings, seed, progress, timings)
        metadata = self.describe_svd(request, settings, seed, frames, still)
        with timings.stage("encode"):
            files = self.encode_files(request, frames, metadata)
        return AnimationResult(files, {**metadata, "timings_ms": timings.finish()}, frames)

    def describe_svd(
        self, request: Any, settings: SvdSettings, seed: int, frames: np.ndarray, still: Any
    ) -> dict[str, Any]:
        """An SVD clip's facts (and the AI label) for the metadata and the files."""
        if still is None:
            source = {
                "source": "client",
                "image_sha256": request.image.sha256,
                "image_bytes": request.image.nbytes,
            }
        else:
            keep = ("prompt", "seed", "steps", "model_version", "unet", "lora", "family", "request")
            source = {"source": "drawn", **{key: still.metadata[key] for key in keep}}
        return {
            "ai_generated": True,
            "generator": f"birdgen {birdgen.__version__}",
            "model_version": self.model_version,
            "engine": "svd",
            "species": request.species,
            "scientific_name": request.scientific_name,
            "species_id": request.species_id,
            "seed": seed,
            "seed_derived": request.seed is None,
            "steps": request.steps,
            "scheduler": "EulerDiscreteScheduler (EDM, Karras sigmas)",
            "width": request.width,
            "height": request.height,
            "frames": int(frames.shape[0]),
            "fps": request.fps,
            "duration_seconds": request.duration_seconds,
            "poster_frame": request.poster_frame,
            "format": request.format,
            "motion_bucket_id": settings.motion_bucket_id,
            "noise_aug_strength": settings.noise_aug_strength,
            "min_guidance_scale": settings.min_guidance_scale,
            "max_guidance_scale": settings.max_guidance_scale,
            "decode_chunk_size": settings.decode_chunk_size,
            "image": source,
            "request": json.loads(request.canonical_json()),
        }

    @staticmethod
    def encode_files(request: Any, frames: np.ndarray, metadata: dict[str, Any]) -> dict[str, bytes]:
        """The clip's files, encoded concurrently: Pillow's encoders release the GIL, so a request
        waits for the slowest file rather than their sum (measured on 2 cores, 16 frames at 512²:
        WebP 111 + GIF 129 + poster 8 ms in a row, 157 ms together)."""
        jobs = {
            fmt: ENCODERS.submit(encode_animation, frames, request.fps, fmt, metadata)
            for fmt in (("webp", "gif") if request.format == "both" else (request.format,))
        }
        jobs["poster"] = ENCODERS.submit(encode_poster, frames[request.poster_frame], metadata)
        return {name: job.result() for name, job in jobs.items()}

    def denoise_clip(
        self,
        request: Any,
        seed: int,
        prompt_embeds: torch.Tensor,
        pooled: torch.Tensor,
        model: str,
        version: int,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> torch.Tensor:
        device = prompt_embeds.device
        generator = torch.Generator("cpu").manual_seed(seed)
        scheduler = self.new_scheduler(request.steps, device)
        frames = request.num_frames
        latents = self.prepare_latents(
            request.height, request.width, generator, scheduler.init_noise_sigma, device, frames=frames
        )
        latents = shuffle_context_noise(latents, generator)
        conditions = self.unet_conditions(request, prompt_embeds, pooled)
        for name, window in zip(CONTEXT_INPUTS, context_windows(frames), strict=True):
            conditions[name] = torch.from_numpy(window[None]).to(device)
        return self.run_steps(
            MOTION_UNET, scheduler, latents, generator, conditions, model, version, progress
        )

    def decode_frames(
        self, latents: torch.Tensor, progress: Callable[[str, int, int], None] | None = None
    ) -> np.ndarray:
        """(1, C, F, h, w) latents -> (F, H, W, 3) uint8 on the host, decoded a VAE batch at a time."""
        per_frame = latents[0].permute(1, 0, 2, 3).contiguous()
        chunk = self.runner.max_batch("vae_decoder")
        pieces = []
        for start in range(0, len(per_frame), chunk):
            pieces.append(
                self.runner.run("vae_decoder", {"latent": per_frame[start : start + chunk]})["image"]
            )
            if progress:
                progress("decode", min(start + chunk, len(per_frame)), len(per_frame))
        return torch.cat(pieces).cpu().numpy()
