"""The torch modules behind each stage contract: the diffusers/transformers model plus the thin glue
that makes its forward match `birdgen.stages` (named tensors in, named tensors out).

The glue does exactly what StableDiffusionXLPipeline does around each model call, so an engine built
from these modules and driven by birdgen's scheduler reproduces the pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from birdgen.contracts import (
    CONTROLLED_UNET,
    SVD_IMAGE_ENCODER,
    SVD_UNET,
    SVD_VAE_DECODER,
    SVD_VAE_ENCODER,
)
from birdgen.model_folder import load_controlnet, load_motion_adapter, load_part, load_svd_part

# The attention projections of every transformer block (self- and cross-attention): where the
# diffusers/SDXL LoRA convention puts adapters, and what `load_lora_weights` and LoRA fusing in export
# expect. They carry the prompt -> appearance mapping a family LoRA adjusts; convolutions and feed-forward
# layers stay untouched, which keeps the adapter small (rank 64 on SDXL: 560 layers, 93M parameters,
# ~350 MB in fp32, against 2.6B in the UNet).
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


class _Wrapper(torch.nn.Module):
    """A stage module around one diffusers or transformers model, kept as `model` (its weights are
    named `model.<name>`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


class _VaeWrapper(torch.nn.Module):
    """A stage module around a VAE, kept as `vae` (its weight names are `vae.<name>`)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae


class TextEncoder(_Wrapper):
    """CLIP text encoder -> penultimate hidden states (SDXL's clip-skip of 1), plus the pooled
    projection for CLIPTextModelWithProjection."""

    def __init__(self, model: torch.nn.Module, pooled: bool) -> None:
        super().__init__(model)
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids, output_hidden_states=True)
        hidden = out.hidden_states[-2]
        return (hidden, out[0]) if self.pooled else (hidden,)


class ContextWindows:
    """One clip's FreeNoise windows, set by the UNet for every ContextWindowBlock of its model.

    diffusers calls motion modules with the frame count only, so the windows cannot travel as
    arguments; the blocks read them from this shared holder during the forward.
    """

    frames: torch.Tensor  # (windows, window length): frame indices
    blend: torch.Tensor  # (frames, windows, window length): normalised blend weights


class ContextWindowBlock(torch.nn.Module):
    """diffusers' FreeNoiseTransformerBlock for a motion module, with the windows as tensors.

    FreeNoise loops over windows in Python, which an exported graph would freeze at one clip
    length. Here all windows are gathered into the batch axis and attended at once, then blended
    back into frames by one matrix product, so one graph serves any length. Self-attention, the
    second (temporal self-)attention and the positional embedding run per window; the feed-forward
    runs per frame after the blend, as in FreeNoise.
    """

    def __init__(self, block: torch.nn.Module, windows: ContextWindows) -> None:
        super().__init__()
        if block.norm_type != "layer_norm" or block.only_cross_attention or block.cross_attention_dim:
            raise ValueError(
                "ContextWindowBlock expects an AnimateDiff temporal block (layer norm, self-attention)"
            )
        self.block = block
        self.windows = windows

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        block, index, blend = self.block, self.windows.frames, self.windows.blend
        batch, frames, channels = hidden_states.shape
        count, length = index.shape
        x = hidden_states[:, index.reshape(-1)].reshape(batch * count, length, channels)
        for norm, attention in ((block.norm1, block.attn1), (block.norm2, block.attn2)):
            if attention is None:
                continue
            normed = norm(x)
            if block.pos_embed is not None:
                normed = block.pos_embed(normed)
            x = attention(normed) + x
        mixing = blend.reshape(frames, count * length).to(x.dtype)
        hidden_states = mixing @ x.reshape(batch, count * length, channels)
        return block.ff(block.norm3(hidden_states)) + hidden_states


def _window_motion_modules(model: torch.nn.Module, windows: ContextWindows) -> None:
    """Swap every temporal transformer block of a UNetMotionModel for a ContextWindowBlock."""
    blocks = [*model.down_blocks, model.mid_block, *model.up_blocks]
    for motion_module in (m for b in blocks for m in getattr(b, "motion_modules", ())):
        layers = motion_module.transformer_blocks
        for i, layer in enumerate(layers):
            layers[i] = ContextWindowBlock(layer, windows)


class UNet(_Wrapper):
    """SDXL UNet with one timestep per batch item, so requests at different steps batch together.

    With `clip=True` it wraps AnimateDiff's UNetMotionModel on one clip (B, C, frames, h, w): it
    takes the prompt embeddings once per clip, repeating them per frame inside as
    AnimateDiffSDXLPipeline does before its UNet call, and the clip's FreeNoise context windows
    (birdgen/free_noise.py), which its temporal blocks attend over.
    """

    def __init__(self, model: torch.nn.Module, clip: bool = False) -> None:
        super().__init__(model)
        self.clip = clip
        if clip:
            self.windows = ContextWindows()
            _window_motion_modules(model, self.windows)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        context_frames: torch.Tensor | None = None,
        context_blend: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor]:
        if self.clip:
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(sample.shape[2], dim=0)
            # One clip per execution (motion_unet_spec): the windows are the batch item's.
            self.windows.frames, self.windows.blend = context_frames[0], context_blend[0]
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        noise = self.model(
            sample,
            timestep.reshape(-1),
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return (noise,)


class ControlledUNet(UNet):
    """SDXL UNet taking ControlNet residuals (stages.controlled_unet_spec): the down residuals then the
    mid one, in stages.control_residuals order, already scaled and summed over the active nets.

    The diffusers UNet stays `model`, so LoRA weight names (`model.<name>`), EngineKind.derive and
    TensorRT refits work as they do for `unet`. All-zero residuals give UNet's output bit for bit.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        *residuals: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        *down, mid = residuals
        noise = self.model(
            sample,
            timestep.reshape(-1),
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            down_block_additional_residuals=tuple(down),
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        return (noise,)


class ControlNet(_Wrapper):
    """A diffusers ControlNetModel on the UNet's inputs plus the control image and a scale per item
    (stages.controlnet_spec): the residuals of StableDiffusionXLControlNetPipeline's ControlNet call,
    down ones then the mid one, each times the item's scale.

    The image comes as uint8 HWC pixels (4x fewer bytes than float CHW) and becomes the pipeline's
    float image here: `np.array(pil).astype(float32) / 255` in CHW, the same values bit for bit. The
    scale multiplies like diffusers' float `conditioning_scale` (equal bit for bit), but per item, so
    requests with different scales or at different steps batch together.
    """

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        image = (controlnet_cond.permute(0, 3, 1, 2).float() / 255).to(sample.dtype)
        down, mid = self.model(
            sample,
            timestep.reshape(-1),
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=image,
            conditioning_scale=1.0,  # diffusers multiplies by it: exact at 1.0; the scale comes below
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )
        scale = conditioning_scale.reshape(-1, 1, 1, 1).to(sample.dtype)
        return tuple(residual * scale for residual in (*down, mid))


def motion_unet(unet2d: torch.nn.Module, adapter: torch.nn.Module) -> torch.nn.Module:
    """diffusers' UNetMotionModel.from_unet2d, plus the SDXL text-time embedding it forgets to copy.

    In diffusers 0.42.1 from_unet2d leaves `add_embedding` randomly initialised (raised in the review
    of huggingface/diffusers PR 6721 and deferred), so AnimateDiffSDXLPipeline built from a 2-D UNet
    conditions every frame on noise. birdgen copies it; the parity tests build the reference with
    this same function.
    """
    from diffusers import UNetMotionModel

    model = UNetMotionModel.from_unet2d(unet2d, adapter)
    if getattr(unet2d, "add_embedding", None) is not None:
        model.add_embedding.load_state_dict(unet2d.add_embedding.state_dict())
    return model.eval()


def motion_unet_module(model_dir: Path, motion_adapter: Path) -> UNet:
    """The folder's UNet with AnimateDiff's motion modules inserted, on one clip per item."""
    unet = motion_unet(load_part(model_dir, "unet"), load_motion_adapter(motion_adapter))
    return UNet(unet, clip=True).eval()


class VaeDecoder(_VaeWrapper):
    """Latents -> uint8 HWC pixels: the pipeline's unscaling, decode and VaeImageProcessor.postprocess."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__(vae)
        config = vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        channels = config.latent_channels
        self.register_buffer("latents_mean", torch.tensor(mean or [0.0] * channels).view(1, channels, 1, 1))
        self.register_buffer("latents_std", torch.tensor(std or [1.0] * channels).view(1, channels, 1, 1))
        self.scaling_factor = float(config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        latent = latent * self.latents_std / self.scaling_factor + self.latents_mean
        image = self.vae.decode(latent, return_dict=False)[0]
        return (_uint8_hwc(image),)


def stage_module(model_dir: Path, stage: str) -> torch.nn.Module:
    """Build the torch module for `stage` from a diffusers folder."""
    if stage == "text_encoder":
        return TextEncoder(load_part(model_dir, "text_encoder"), pooled=False).eval()
    if stage == "text_encoder_2":
        return TextEncoder(load_part(model_dir, "text_encoder_2"), pooled=True).eval()
    if stage == "unet":
        return UNet(load_part(model_dir, "unet")).eval()
    if stage == "vae_decoder":
        return VaeDecoder(load_part(model_dir, "vae")).eval()
    if stage == CONTROLLED_UNET:
        return controlled_unet_module(model_dir)
    allowed = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", CONTROLLED_UNET)
    raise ValueError(f"unknown stage {stage!r}; allowed: {', '.join(allowed)}")


def controlled_unet_module(model_dir: Path) -> ControlledUNet:
    """The folder's UNet taking ControlNet residuals (stage CONTROLLED_UNET)."""
    return ControlledUNet(load_part(model_dir, "unet")).eval()


def controlnet_module(model_dir: Path, controlnet: Path) -> ControlNet:
    """The ControlNet folder `controlnet` (checked against the UNet and VAE of `model_dir`) as a stage."""
    return ControlNet(load_controlnet(controlnet, model_dir)).eval()


# Which folder parts each stage is built from (their files key the export cache). A ControlNet stage
# is built from its own folder (controlnet_module), not a part of the model folder.
STAGE_PARTS = {
    "text_encoder": ("text_encoder",),
    "text_encoder_2": ("text_encoder_2",),
    "unet": ("unet",),
    "vae_decoder": ("vae",),
    CONTROLLED_UNET: ("unet",),
}


# Stable Video Diffusion (docs/svd.md): four stages, the denoising loop in the entry. Each wrapper is
# StableVideoDiffusionPipeline's own computation around one model call, batched per item.


def _uint8_hwc(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NHWC: VaeImageProcessor.postprocess (denormalise, clamp) then
    diffusers' numpy_to_pil rounding (the SDXL and SVD decoders' last step)."""
    image = (image * 0.5 + 0.5).clamp(0, 1)
    return (image.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)


class SvdImageEncoder(_Wrapper):
    """CLIPVisionModelWithProjection -> image_embeds (B, D), the pipeline's `_encode_image` after its
    preprocessing: the input is the picture already resized to 224 px with diffusers'
    `_resize_with_antialiasing` and CLIP-normalised (the caller does both: the blur's kernel depends
    on the picture's size)."""

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(pixel_values).image_embeds,)


class SvdVaeEncoder(_VaeWrapper):
    """The conditioning picture (B, 3, H, W) in [-1, 1], noise already added -> the posterior's mode
    (B, C, H/8, W/8), NOT multiplied by the scaling factor (`_encode_vae_image`)."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.encode(image).latent_dist.mode(),)


class SvdUNet(_Wrapper):
    """UNetSpatioTemporalConditionModel on one clip (or one CFG half of it) per batch item.

    `sample` (B, frames, C, h, w) is the scaled latents (`scale_model_input`); `image_latents`
    (B, C, h, w) is concatenated to every frame on the channel axis here, as the pipeline does before
    its UNet call; `image_embeds` (B, D) becomes the (B, 1, D) encoder states; one timestep per item,
    so clips at different steps batch together; `added_time_ids` (B, 3): fps - 1, motion bucket,
    noise augmentation strength.
    """

    def forward(
        self,
        sample: torch.Tensor,
        image_latents: torch.Tensor,
        timestep: torch.Tensor,
        image_embeds: torch.Tensor,
        added_time_ids: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        condition = image_latents.unsqueeze(1).expand(-1, sample.shape[1], -1, -1, -1)
        noise = self.model(
            torch.cat([sample, condition.to(sample.dtype)], dim=2),
            timestep.reshape(-1),
            encoder_hidden_states=image_embeds.unsqueeze(1),
            added_time_ids=added_time_ids,
            return_dict=False,
        )[0]
        return (noise,)


class SvdVaeDecoder(_VaeWrapper):
    """One chunk of frames per batch item (B, chunk, C, h, w), unscaled latents -> uint8 frames
    (B, chunk, H, W, 3): `decode_latents`' reciprocal multiply and temporal decode, then the image
    path's postprocess. Items are independent clips: the decoder's temporal layers (time_conv_out,
    the temporal resnets, `image_only_indicator`) reshape its input per `num_frames` = chunk, so the
    whole batch decodes in one call without frames of one item mixing with another's."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__(vae)
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        batch, chunk = latent.shape[:2]
        # A multiply by the reciprocal, as diffusers (not a division: they differ in the last bit).
        frames = latent.flatten(0, 1) * (1 / self.scaling_factor)
        image = self.vae.decode(frames, num_frames=chunk, return_dict=False)[0]
        pixels = _uint8_hwc(image)
        return (pixels.reshape(batch, chunk, *pixels.shape[1:]),)


# Each SVD stage: its wrapper and the SVD folder's part it wraps.
SVD_STAGE_PARTS: dict[str, tuple[type[torch.nn.Module], str]] = {
    SVD_IMAGE_ENCODER: (SvdImageEncoder, "image_encoder"),
    SVD_VAE_ENCODER: (SvdVaeEncoder, "vae"),
    SVD_UNET: (SvdUNet, "unet"),
    SVD_VAE_DECODER: (SvdVaeDecoder, "vae"),
}


def svd_stage_module(svd_dir: Path, stage: str) -> torch.nn.Module:
    """The torch module of an SVD `stage` (contracts.SVD_STAGES) from a Stable Video Diffusion folder."""
    if stage not in SVD_STAGE_PARTS:
        raise ValueError(f"unknown SVD stage {stage!r}; allowed: {', '.join(SVD_STAGE_PARTS)}")
    wrapper, part = SVD_STAGE_PARTS[stage]
    return wrapper(load_svd_part(svd_dir, part)).eval()
