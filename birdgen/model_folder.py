"""One loader for any local diffusers SDXL folder: the tiny test model and a real sdxl-turbo copy alike.

`ModelDims` reads only the JSON configs (no torch), so export, config generation and the serving
models agree on tensor shapes without loading weights. `load_part` loads one component with the
library class named in model_index.json, from safetensors only: pickle weights (*.bin, ...) are
refused, since loading them can run code (docs/security.md). ControlNets are separate folders (the tiny
model writes two inside its own, real ones are downloads such as diffusers/controlnet-depth-sdxl-1.0):
`check_controlnet` holds one against the UNet and VAE it will run with, from the configs alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

# The parts birdgen serves from, and the file that proves each one is there.
REQUIRED_PARTS: dict[str, str] = {
    "tokenizer": "vocab.json",
    "tokenizer_2": "vocab.json",
    "text_encoder": "config.json",
    "text_encoder_2": "config.json",
    "unet": "config.json",
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
}
WEIGHT_PARTS = ("text_encoder", "text_encoder_2", "unet", "vae")
# Weight formats read with pickle, which runs code from the file while loading it: never read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_REFUSED = (
    "birdgen reads weights from .safetensors files only; pickle formats (.bin, .pt, .pth, .ckpt, .pkl) "
    "are refused because loading one can run any code it carries"
)


class ModelFolderError(ValueError):
    """The folder is not a usable diffusers SDXL layout; the message names the missing part."""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# ControlNet config keys that must equal the UNet's: they fix the residuals' channels, count and the
# added embedding's input. The depths (transformer_layers_per_block) may differ: real SDXL ControlNets
# can be slimmer than their UNet, and the residual shapes do not depend on them.
CONTROLNET_MATCHES_UNET = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
)
# ControlNetModel's constructor defaults for the checked keys a config.json may leave out.
_CONTROLNET_DEFAULTS: dict[str, Any] = {"conditioning_channels": 3, "global_pool_conditions": False}


def check_model_folder(model_dir: Path, controlnet: Path | None = None) -> dict[str, Any]:
    """Validate the layout and return model_index.json; raise ModelFolderError naming what is missing.

    With `controlnet` (a ControlNetModel folder), also check that it fits this folder's UNet and VAE.
    """
    model_dir = Path(model_dir)
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise ModelFolderError(f"{model_dir} is not a diffusers model folder: model_index.json is missing")
    index = _read_json(index_path)
    for part, marker in REQUIRED_PARTS.items():
        if part not in index or index[part][0] is None:
            raise ModelFolderError(
                f"{model_dir}: model_index.json lists no '{part}' (an SDXL folder needs it)"
            )
        if not (model_dir / part / marker).is_file():
            raise ModelFolderError(f"{model_dir}: part '{part}' is missing ({part}/{marker} not found)")
    for part in WEIGHT_PARTS:
        check_safetensors(model_dir / part, f"{model_dir}: part '{part}'")
    if controlnet is not None:
        check_controlnet(controlnet, model_dir)
    return index


def check_controlnet(path: Path, model_dir: Path) -> dict[str, Any]:
    """Return the ControlNet config at `path`; raise ModelFolderError naming every key (with both values)
    that does not fit the UNet and VAE of `model_dir`, or weights that are not safetensors."""
    path, model_dir = Path(path), Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelFolderError(
            f"no ControlNet at {path} (a diffusers ControlNetModel folder with config.json)"
        )
    config = _read_json(path / "config.json")
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ModelFolderError(
            f"ControlNet {path}: config.json is a {config['_class_name']}, not a ControlNetModel"
        )
    unet = _read_json(model_dir / "unet" / "config.json")
    vae = _read_json(model_dir / "vae" / "config.json")
    expected = {key: unet.get(key) for key in CONTROLNET_MATCHES_UNET} | _CONTROLNET_DEFAULTS
    actual = {key: config.get(key, _CONTROLNET_DEFAULTS.get(key)) for key in expected}
    wrong = [
        f"{key}: controlnet {actual[key]!r}, expected {want!r}"
        for key, want in expected.items()
        if actual[key] != want
    ]
    down = len(config.get("down_block_types", ()))
    if down != len(unet["down_block_types"]):
        wrong.append(f"len(down_block_types): controlnet {down}, unet {len(unet['down_block_types'])}")
    embedding = config.get("conditioning_embedding_out_channels") or []
    if len(embedding) != len(vae["block_out_channels"]):
        wrong.append(
            f"conditioning_embedding_out_channels: controlnet {embedding} downsamples by "
            f"{2 ** max(len(embedding) - 1, 0)}, the VAE by {2 ** (len(vae['block_out_channels']) - 1)} "
            "(the embedding must land on the latent grid)"
        )
    if wrong:
        raise ModelFolderError(f"ControlNet {path} does not fit the UNet of {model_dir}: " + "; ".join(wrong))
    check_safetensors(path, f"ControlNet {path}")
    return config


def load_controlnet(path: Path, model_dir: Path) -> Any:
    """A diffusers ControlNetModel folder, checked against `model_dir` (check_controlnet), in fp32."""
    import torch
    from diffusers import ControlNetModel

    check_controlnet(path, model_dir)
    variant = _weights_variant(Path(path))
    extra = {"variant": variant} if variant else {}
    model = ControlNetModel.from_pretrained(path, torch_dtype=torch.float32, use_safetensors=True, **extra)
    return model.eval()


def check_safetensors(folder: Path, what: str) -> None:
    """Raise ModelFolderError unless `folder` has *.safetensors weights, saying how to convert
    pickle-only ones (e.g. a diffusers folder saved before safetensors was the default)."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise ModelFolderError(f"{what} has no weights (*.safetensors)")
    raise ModelFolderError(
        f"{what} has only pickle weights ({', '.join(pickled)}): {PICKLE_REFUSED}. Download the "
        ".safetensors files of the model, or convert on a machine you trust: load the part once with "
        "diffusers/transformers and save_pretrained(..., safe_serialization=True)"
    )


class _Dims:
    """What ModelDims and SvdDims (frozen dataclasses) share: the image size stride and the JSON form
    kept in export manifests."""

    vae_scale_factor: int
    unet_levels: int

    @property
    def pixel_stride(self) -> int:
        """Image sizes must be multiples of this: VAE factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (self.unet_levels - 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """From to_dict's output, also after a JSON round trip (lists back into tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class ModelDims(_Dims):
    """The tensor sizes every stage contract derives from, read from the folder's configs."""

    max_tokens: int
    text_hidden: int
    text_hidden_2: int
    pooled_dim: int
    latent_channels: int
    vae_scale_factor: int
    unet_levels: int
    vocab_size: int
    time_ids_dim: int = 6
    # The UNet's block_out_channels and layers_per_block: they fix the ControlNet residuals
    # (stages.control_residuals). Empty/0 in manifests written before ControlNets (re-export to serve them).
    unet_channels: tuple[int, ...] = ()
    unet_layers: int = 0

    @property
    def cross_attention_dim(self) -> int:
        return self.text_hidden + self.text_hidden_2

    @classmethod
    def from_folder(cls, model_dir: Path) -> ModelDims:
        model_dir = Path(model_dir)
        check_model_folder(model_dir)
        te = _read_json(model_dir / "text_encoder" / "config.json")
        te2 = _read_json(model_dir / "text_encoder_2" / "config.json")
        unet = _read_json(model_dir / "unet" / "config.json")
        vae = _read_json(model_dir / "vae" / "config.json")
        tok = _read_json(model_dir / "tokenizer" / "tokenizer_config.json")
        layers = unet.get("layers_per_block", 2)  # diffusers' default
        if not isinstance(layers, int):
            raise ModelFolderError(
                f"{model_dir}: unet layers_per_block {layers!r} is a per-level list; birdgen needs one "
                "number of layers for every level (SDXL's config has 2)"
            )
        dims = cls(
            max_tokens=int(tok.get("model_max_length", te.get("max_position_embeddings", 77))),
            text_hidden=int(te["hidden_size"]),
            text_hidden_2=int(te2["hidden_size"]),
            pooled_dim=int(te2["projection_dim"]),
            latent_channels=int(vae["latent_channels"]),
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            unet_levels=len(unet["block_out_channels"]),
            vocab_size=int(te["vocab_size"]),
            unet_channels=tuple(int(c) for c in unet["block_out_channels"]),
            unet_layers=layers,
        )
        if unet.get("cross_attention_dim") != dims.cross_attention_dim:
            raise ModelFolderError(
                f"{model_dir}: unet cross_attention_dim {unet.get('cross_attention_dim')} does not match "
                f"the two text encoders ({dims.text_hidden} + {dims.text_hidden_2})"
            )
        if unet.get("addition_embed_type") != "text_time":
            raise ModelFolderError(
                f"{model_dir}: unet is not an SDXL UNet (addition_embed_type != 'text_time')"
            )
        return dims


def load_motion_adapter(path: Path) -> Any:
    """An AnimateDiff motion adapter folder (the tiny one, or e.g. animatediff-motion-adapter-sdxl-beta)."""
    from diffusers import MotionAdapter

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelFolderError(
            f"no motion adapter at {path} (a diffusers MotionAdapter folder with config.json)"
        )
    check_safetensors(path, f"motion adapter {path}")
    return MotionAdapter.from_pretrained(path, use_safetensors=True).eval()


def _weights_variant(part_dir: Path) -> str | None:
    """sdxl-turbo ships some parts only as `*.fp16.safetensors`; load those when the plain ones are absent."""
    plain = [p for p in part_dir.glob("*.safetensors") if ".fp16." not in p.name]
    return None if plain or not any(part_dir.glob("*.fp16.safetensors")) else "fp16"


def load_part(model_dir: Path, part: str, **kwargs: Any) -> Any:
    """Load one component with the class model_index.json names (diffusers or transformers), in fp32."""
    model_dir = Path(model_dir)
    cls = _part_class(model_dir, check_model_folder(model_dir), part)
    if part not in WEIGHT_PARTS:
        return cls.from_pretrained(model_dir / part)  # no weights: a tokenizer or the scheduler
    return _load_weights(cls, model_dir / part, **kwargs)


def _part_class(folder: Path, index: dict[str, Any], part: str) -> Any:
    """The class model_index.json names for `part` (diffusers or transformers only)."""
    import diffusers
    import transformers

    library, class_name = index[part]
    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    if module is None:
        raise ModelFolderError(f"{folder}: part '{part}' comes from unsupported library '{library}'")
    return getattr(module, class_name)


def _load_weights(cls: Any, part_dir: Path, **kwargs: Any) -> Any:
    """A part with weights, in fp32 and eval mode (the fp16 variant when only that is there)."""
    import torch

    variant = _weights_variant(part_dir)
    extra = {"variant": variant} if variant else {}
    # use_safetensors: never fall back to a pickled *.bin beside the safetensors (check_model_folder).
    model = cls.from_pretrained(part_dir, torch_dtype=torch.float32, use_safetensors=True, **extra, **kwargs)
    return model.eval()


# Stable Video Diffusion (docs/svd.md): a StableVideoDiffusionPipeline folder, e.g. the tiny model's
# `svd/` or a download of stabilityai/stable-video-diffusion-img2vid(-xt). Each part, the file that
# proves it is there, and the class model_index.json must name for it.
SVD_PARTS: dict[str, tuple[str, str]] = {
    "image_encoder": ("config.json", "CLIPVisionModelWithProjection"),
    "feature_extractor": ("preprocessor_config.json", "CLIPImageProcessor"),
    "unet": ("config.json", "UNetSpatioTemporalConditionModel"),
    "vae": ("config.json", "AutoencoderKLTemporalDecoder"),
    "scheduler": ("scheduler_config.json", "EulerDiscreteScheduler"),
}
SVD_WEIGHT_PARTS = ("image_encoder", "unet", "vae")
# diffusers resizes every conditioning image to 224 x 224 for the image encoder (_encode_image).
SVD_CLIP_SIZE = 224
# Constructor defaults of the checked keys a config.json may leave out (UNetSpatioTemporalConditionModel,
# AutoencoderKLTemporalDecoder, CLIPVisionConfig).
_SVD_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": {
        "in_channels": 8,
        "out_channels": 4,
        "cross_attention_dim": 1024,
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 768,
        "block_out_channels": [320, 640, 1280, 1280],
        "num_frames": 25,
    },
    "vae": {"latent_channels": 4, "block_out_channels": [64], "scaling_factor": 0.18215},
    "image_encoder": {"image_size": 224, "projection_dim": 512},
}


def _svd_configs(path: Path) -> dict[str, dict[str, Any]]:
    """The unet, vae and image_encoder configs of an SVD folder, defaults filled in."""
    return {
        part: defaults | _read_json(path / part / "config.json") for part, defaults in _SVD_DEFAULTS.items()
    }


def check_svd_folder(path: Path) -> dict[str, Any]:
    """Validate a Stable Video Diffusion folder and return its model_index.json; raise ModelFolderError
    naming the missing part, the wrong class or config key (with both values), or pickle-only weights."""
    path = Path(path)
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise ModelFolderError(
            f"{path} is not a Stable Video Diffusion folder (StableVideoDiffusionPipeline's layout): "
            "model_index.json is missing"
        )
    index = _read_json(index_path)
    for part, (marker, class_name) in SVD_PARTS.items():
        entry = index.get(part)
        if not entry or entry[0] is None:
            raise ModelFolderError(f"{path}: model_index.json lists no '{part}' (an SVD folder needs it)")
        if entry[1] != class_name:
            raise ModelFolderError(
                f"{path}: part '{part}' is a {entry[1]}, expected {class_name} (is this an SVD folder?)"
            )
        if not (path / part / marker).is_file():
            raise ModelFolderError(f"{path}: part '{part}' is missing ({part}/{marker} not found)")
    configs = _svd_configs(path)
    unet, vae, encoder = configs["unet"], configs["vae"], configs["image_encoder"]
    expected = {
        "unet.cross_attention_dim": (unet["cross_attention_dim"], encoder["projection_dim"]),
        "unet.in_channels": (unet["in_channels"], 2 * vae["latent_channels"]),
        "unet.out_channels": (unet["out_channels"], vae["latent_channels"]),
        "unet.projection_class_embeddings_input_dim": (
            unet["projection_class_embeddings_input_dim"],
            3 * unet["addition_time_embed_dim"],
        ),
        "image_encoder.image_size": (encoder["image_size"], SVD_CLIP_SIZE),
    }
    wrong = [f"{key}: {got!r}, expected {want!r}" for key, (got, want) in expected.items() if got != want]
    if wrong:
        raise ModelFolderError(f"{path}: the SVD parts do not fit together: " + "; ".join(wrong))
    for part in SVD_WEIGHT_PARTS:
        check_safetensors(path / part, f"{path}: part '{part}'")
    return index


@dataclass(frozen=True)
class SvdDims(_Dims):
    """The tensor sizes of the SVD stages, read from the folder's JSON configs (no torch)."""

    latent_channels: int
    vae_scale_factor: int
    unet_levels: int
    image_embed_dim: int  # the image encoder's projection_dim = the UNet's cross_attention_dim
    clip_size: int  # the encoder's input side (224)
    default_frames: int  # the UNet's num_frames: 14 for img2vid, 25 for img2vid-xt
    scaling_factor: float
    added_time_ids: int = 3  # fps - 1, motion_bucket_id, noise_aug_strength

    @classmethod
    def from_folder(cls, path: Path) -> SvdDims:
        path = Path(path)
        check_svd_folder(path)
        configs = _svd_configs(path)
        unet, vae, encoder = configs["unet"], configs["vae"], configs["image_encoder"]
        return cls(
            latent_channels=int(vae["latent_channels"]),
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            unet_levels=len(unet["block_out_channels"]),
            image_embed_dim=int(encoder["projection_dim"]),
            clip_size=int(encoder["image_size"]),
            default_frames=int(unet["num_frames"]),
            scaling_factor=float(vae["scaling_factor"]),
        )


def load_svd_part(path: Path, part: str, **kwargs: Any) -> Any:
    """One part of an SVD folder (check_svd_folder) with the class model_index.json names: the
    weights in fp32 from safetensors (the `.fp16.safetensors` variant when only that is there), the
    feature extractor and scheduler from their JSON."""
    path = Path(path)
    index = check_svd_folder(path)
    if part not in SVD_PARTS:
        raise ValueError(f"unknown SVD part {part!r}; allowed: {', '.join(SVD_PARTS)}")
    cls = _part_class(path, index, part)
    if part not in SVD_WEIGHT_PARTS:
        return cls.from_pretrained(path / part, **kwargs)  # no weights: the feature extractor or scheduler
    return _load_weights(cls, path / part, **kwargs)
