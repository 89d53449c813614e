"""The entry models' contract: model names, their tensors, and the repository's file names.

Why one module: the client, the exporter, the Triton configs, the entry ``model.py`` files and the
benchmark harness all speak this contract. Each reads the names from here (stdlib only, so the
torch-free client can), and the generated ``config.pbtxt`` files are written from them, so a
rename is one edit. Docs: docs/architecture.md.
"""

from __future__ import annotations

# Entry models (python backend, one JSON request in, encoded media out).
IMAGE_MODEL = "bird_image"
ANIMATION_MODEL = "bird_animation"
ANIMATION_STREAM_MODEL = "bird_animation_stream"  # decoupled twin of ANIMATION_MODEL
ENTRY_INPUT = "request"  # TYPE_STRING [1]: the request JSON (birdgen.schema)
# Every output is TYPE_STRING [1]; an empty string stands for a file the request did not ask for.
METADATA = "metadata"  # JSON: the request, model version, seed, timings, AI label
IMAGE = "image"  # the encoded image (a format=eink request: its PNG preview)
EINK_BUFFER = "eink_buffer"  # the packed panel buffer of a format=eink request, else empty
IMAGE_OUTPUTS = (IMAGE, EINK_BUFFER, METADATA)
WEBP, GIF, POSTER = "webp", "gif", "poster"  # the clip, in each format asked for, and its still PNG
ANIMATION_FILES = (WEBP, GIF, POSTER)
ANIMATION_OUTPUTS = (*ANIMATION_FILES, METADATA)
# gRPC metadata / HTTP header that unlocks Triton's admin protocols (model load/unload, repository
# index, config, shared memory, trace, logging) when a server runs with an admin key (birdgen.server).
ADMIN_KEY_HEADER = "birdgen-admin-key"  # the HTTP header
ADMIN_KEY_GRPC = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"  # the gRPC metadata key Triton checks
ADMIN_PROTOCOLS = ("model-repository", "model-config", "shared-memory", "trace", "logging")
PROGRESS = "progress"  # one JSON message per denoising step and decoded chunk (stream only)
STREAM_OUTPUTS = (*ANIMATION_OUTPUTS, PROGRESS)

# Stage models that the entries route between.
BASE_UNET = "unet"
MOTION_UNET = "motion_unet"
# The UNet that takes ControlNet residuals (not "unet_controlled": family_of would read a family).
CONTROLLED_UNET = "controlled_unet"

# Files of an exported repository.
MANIFEST = "manifest.json"  # repository root: every file's SHA-256, the engine, the entries
PIPELINE_FILE = "pipeline.json"  # an entry's version folder: what its pipeline needs
LORA_FILE = "lora.json"  # a family UNet's version folder: the fused LoRA's record
TARGET_FILE = "export_target.json"  # repository root: the engine and GPUs the export was built for
MANIFEST_SIGNATURE = "manifest.json.sig"  # repository root: Ed25519 signature of MANIFEST (optional)
# `birdgen keygen`: the signing key pair (PEM). The private key stays where exports are made.
SIGNING_KEY = "manifest-signing.key"
PUBLIC_KEY = "manifest-signing.pub"
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")  # the two CLIP tokenizers, diffusers folder names
# An entry's version folder, with SVD exported: the SVD scheduler config and CLIP image normalisation.
SVD_SCHEDULER_DIR, SVD_FEATURE_EXTRACTOR_DIR = "svd_scheduler", "svd_feature_extractor"
MOTION_ADAPTER = "motion_adapter"  # model folder: the AnimateDiff motion adapter
CONTROLNET_KINDS = ("openpose", "depth")  # request order, the order of diffusers' MultiControlNetModel
# Stable Video Diffusion (issue 18, docs/svd.md): its diffusers folder inside a model folder (the tiny
# model writes one there, a real one is e.g. stable-video-diffusion-img2vid-xt) and its stage models.
# No stage name starts with a family prefix (unet_, motion_unet_, controlled_unet_): family_of -> None.
SVD_FOLDER = "svd"
SVD_IMAGE_ENCODER = "svd_image_encoder"  # CLIP image embedding of the conditioning image
SVD_VAE_ENCODER = "svd_vae_encoder"  # the conditioning image's latents (the posterior's mode)
SVD_UNET = "svd_unet"  # UNetSpatioTemporalConditionModel, one clip (or its CFG half) per batch item
SVD_VAE_DECODER = "svd_vae_decoder"  # the temporal decoder, one chunk of frames per batch item
SVD_STAGES = (SVD_IMAGE_ENCODER, SVD_VAE_ENCODER, SVD_UNET, SVD_VAE_DECODER)


def controlnet_folder(kind: str) -> str:
    """The folder of a `kind` ControlNet inside a model folder (the tiny model writes both there)."""
    return f"controlnet-{kind}"


def controlnet_model(kind: str) -> str:
    """Triton model name of a `kind` ControlNet stage (its residuals feed CONTROLLED_UNET)."""
    return f"controlnet_{kind}"


def family_model(family: str, base: str = BASE_UNET) -> str:
    """Triton model name of a family's fused UNet (`base` = motion_unet: its AnimateDiff twin)."""
    return f"{base}_{family.lower()}"


def family_of(model: str) -> str | None:
    """The family suffix of a family UNet's model name (unet_x, motion_unet_x, controlled_unet_x) or None."""
    for base in (MOTION_UNET, CONTROLLED_UNET, BASE_UNET):
        if model.startswith(f"{base}_"):
            return model[len(base) + 1 :]
    return None
