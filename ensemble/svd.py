"""Stable Video Diffusion clips: StableVideoDiffusionPipeline's algorithm over birdgen's stage runner.

The clip animates a picture: the client's, or the still of the same structured request, drawn first
by the image pipeline of this entry (the same bytes the image entry serves for it). Four stages do
the heavy work (`svd_image_encoder`, `svd_vae_encoder`, `svd_unet`, `svd_vae_decoder`); the entry
does what diffusers does between them, in the same order and dtype, so the same seed draws the same
noise: the 224 px antialiased resize and CLIP normalisation of the picture, the noise augmentation
(the generator's first draw), the initial latents (its second), the EDM Euler scheduler
(`EulerDiscreteScheduler`, diffusers' own), the per-frame guidance ramp from min to max, and the
decode in chunks of `decode_chunk_size` frames. The guidance pass's two halves go to the UNet as two
batch items of one call (the unconditional one with zero image embeddings and latents), so they
batch with other requests' items. Design and measurements: docs/svd.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    _resize_with_antialiasing,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from birdgen.contracts import (
    SVD_FEATURE_EXTRACTOR_DIR,
    SVD_IMAGE_ENCODER,
    SVD_SCHEDULER_DIR,
    SVD_UNET,
    SVD_VAE_DECODER,
    SVD_VAE_ENCODER,
)

Progress = Callable[[str, int, int], None] | None


@dataclass(frozen=True)
class SvdSettings:
    """What one clip is drawn with (the request's SVD fields, resolved)."""

    frames: int
    steps: int
    width: int
    height: int
    fps: int
    motion_bucket_id: int
    noise_aug_strength: float
    min_guidance_scale: float
    max_guidance_scale: float
    decode_chunk_size: int

    @classmethod
    def of(cls, request: Any) -> SvdSettings:
        return cls(
            frames=request.num_frames,
            steps=request.steps,
            width=request.width,
            height=request.height,
            fps=request.fps,
            motion_bucket_id=request.motion_bucket_id,
            noise_aug_strength=request.noise_aug_strength,
            min_guidance_scale=request.min_guidance_scale,
            max_guidance_scale=request.max_guidance_scale,
            decode_chunk_size=request.decode_chunk_size,
        )

    @property
    def guided(self) -> bool:
        """diffusers decides classifier-free guidance on the max scale alone."""
        return self.max_guidance_scale > 1


class SvdLoop:
    """The SVD part of an animation entry: built from the entry's version folder (see export)."""

    def __init__(self, bundle_dir: Path, runner: Any) -> None:
        self.runner = runner
        self.scheduler = EulerDiscreteScheduler.from_config(
            EulerDiscreteScheduler.load_config(bundle_dir / SVD_SCHEDULER_DIR)
        )
        processor = json.loads(
            (bundle_dir / SVD_FEATURE_EXTRACTOR_DIR / "preprocessor_config.json").read_text()
        )
        self.clip_mean = torch.tensor(processor["image_mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.clip_std = torch.tensor(processor["image_std"], dtype=torch.float32).view(1, 3, 1, 1)
        self.clip_size = int(processor.get("crop_size", {}).get("height", 224))

    def __call__(
        self,
        picture: Image.Image,
        settings: SvdSettings,
        seed: int,
        progress: Progress = None,
        timings: Any = None,
    ) -> np.ndarray:
        """The clip's frames, uint8 (frames, height, width, 3), animating `picture` (RGB, any size);
        `timings` (the entry's Timings) hears each stage's wall time."""
        stage = timings.stage if timings is not None else (lambda _: contextlib.nullcontext())
        generator = torch.Generator("cpu").manual_seed(seed)
        with stage(SVD_IMAGE_ENCODER):
            embeds = self.encode_picture(picture)
        with stage(SVD_VAE_ENCODER):
            image_latents = self.encode_latents(picture, settings, generator, embeds.device)
        with stage(SVD_UNET):
            latents = self.denoise(embeds, image_latents, settings, generator, progress)
        with stage(SVD_VAE_DECODER):
            return self.decode(latents, settings, progress)

    def encode_picture(self, picture: Image.Image) -> torch.Tensor:
        """CLIP image embeddings (1, D) of the original picture: diffusers' `_encode_image` (pil_to_numpy,
        [-1, 1], antialiased resize to 224², back to [0, 1], the feature extractor's normalisation)."""
        x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        x = _resize_with_antialiasing(x * 2.0 - 1.0, (self.clip_size, self.clip_size))
        x = ((x + 1.0) / 2.0 - self.clip_mean) / self.clip_std
        return self.runner.run(SVD_IMAGE_ENCODER, {"pixel_values": x.contiguous()})["image_embeds"]

    def encode_latents(
        self, picture: Image.Image, settings: SvdSettings, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """The VAE latents (1, C, h, w) of the picture at the clip's size, noise-augmented with the
        generator's first draw (diffusers' video processor: Lanczos, [-1, 1])."""
        resized = (
            picture
            if picture.size == (settings.width, settings.height)
            else picture.resize((settings.width, settings.height), Image.Resampling.LANCZOS)
        )
        y = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] * 2.0 - 1.0
        noise = randn_tensor(y.shape, generator=generator, device=torch.device("cpu"), dtype=y.dtype)
        y = (y + settings.noise_aug_strength * noise).contiguous().to(device)
        return self.runner.run(SVD_VAE_ENCODER, {"image": y})["image_latents"]

    def new_scheduler(self, steps: int, device: torch.device) -> EulerDiscreteScheduler:
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(steps, device=device)
        return scheduler

    def denoise(
        self,
        embeds: torch.Tensor,
        image_latents: torch.Tensor,
        settings: SvdSettings,
        generator: torch.Generator,
        progress: Progress = None,
    ) -> torch.Tensor:
        """The EDM Euler loop: (1, frames, C, h, w) latents from the generator's second draw; each step
        one UNet call of the conditional item, and the unconditional one before it when guided."""
        device = embeds.device
        scheduler = self.new_scheduler(settings.steps, device)
        channels, h, w = image_latents.shape[1:]
        shape = (1, settings.frames, channels, h, w)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma
        ids = torch.tensor(
            [[settings.fps - 1, settings.motion_bucket_id, settings.noise_aug_strength]],
            dtype=torch.float32,
            device=device,
        )
        conditions = {"image_latents": image_latents, "image_embeds": embeds, "added_time_ids": ids}
        if settings.guided:
            conditions = {
                "image_latents": torch.cat([torch.zeros_like(image_latents), image_latents]),
                "image_embeds": torch.cat([torch.zeros_like(embeds), embeds]),
                "added_time_ids": torch.cat([ids, ids]),
            }
        ramp = torch.linspace(settings.min_guidance_scale, settings.max_guidance_scale, settings.frames)
        guidance = ramp.view(1, settings.frames, 1, 1, 1).to(device)
        items = 2 if settings.guided else 1
        for step, t in enumerate(scheduler.timesteps, start=1):
            sample = scheduler.scale_model_input(latents, t)
            inputs = {
                "sample": torch.cat([sample] * items),
                "timestep": t.to(torch.float32).reshape(1, 1).repeat(items, 1),
                **conditions,
            }
            noise = self.runner.run(SVD_UNET, inputs)["noise_pred"]
            if settings.guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance * (cond - uncond)
            latents = scheduler.step(noise, t, latents).prev_sample
            if progress:
                progress("denoise", step, settings.steps)
        return latents

    def decode(self, latents: torch.Tensor, settings: SvdSettings, progress: Progress = None) -> np.ndarray:
        """Frames in chunks of `decode_chunk_size` (each chunk one decoder call: frames mix inside it)."""
        flat = latents.flatten(0, 1)
        chunk = settings.decode_chunk_size
        pieces = []
        for start in range(0, len(flat), chunk):
            part = flat[start : start + chunk].contiguous()
            pieces.append(self.runner.run(SVD_VAE_DECODER, {"latent": part[None]})["image"][0])
            if progress:
                progress("decode", min(start + chunk, len(flat)), len(flat))
        return torch.cat(pieces).cpu().numpy()
