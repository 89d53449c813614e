"""Family LoRAs: read, check against the UNet, fuse into a plain UNet that exports like the base one.

Checked before anything is written: every LoRA layer must name a module of *this* UNet with matching
shapes (a LoRA for SD 1.5 or for another SDXL variant fails here, naming the module), and only UNet
layers are accepted (text-encoder LoRAs would need per-family text encoders too). Fusing uses
diffusers' own load_lora_adapter + fuse_lora, the same arithmetic as `pipe.load_lora_weights(...);
pipe.fuse_lora()`, so the fused engine matches diffusers with the LoRA applied.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from birdgen.model_folder import PICKLE_REFUSED, PICKLE_SUFFIXES, load_part

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
# peft naming (lora_A / lora_B) and diffusers' file naming (lora.down / lora.up) of the two halves.
_LAYER = re.compile(r"^unet\.(?P<module>.+?)\.(?:lora_(?P<half>[AB])|lora\.(?P<updown>down|up))\.weight$")


class LoraError(ValueError):
    """The LoRA cannot be used with this model; the message names the file, module and shapes."""


@dataclass(frozen=True)
class LoraInfo:
    path: Path
    sha256: str
    rank: int
    layers: int
    weights: tuple[str, ...]  # the UNet weights fusing it changes (`<module>.weight`)


def lora_file(path: Path) -> Path:
    """A LoRA given as its folder (diffusers layout) or as the .safetensors file itself.

    Safetensors only: a pickled LoRA (.bin, .pt, ...) is refused before it is opened, since loading
    pickle runs whatever code the file carries.
    """
    path = Path(path)
    if path.is_dir():
        pickled = sorted(p for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES)
        weights = path / LORA_WEIGHTS
        # A folder with only a pickled LoRA (pytorch_lora_weights.bin): refused below, by its name.
        path = weights if weights.is_file() or not pickled else pickled[0]
    if not path.is_file():
        raise LoraError(
            f"LoRA not found: {path} (give its folder with {LORA_WEIGHTS}, or a .safetensors file)"
        )
    if path.suffix != ".safetensors":
        raise LoraError(
            f"{path}: not a .safetensors file; {PICKLE_REFUSED}. Convert it on a machine you trust: "
            'python -c "import sys, torch, safetensors.torch as st; '
            'st.save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2])" '
            f"{path.name} {LORA_WEIGHTS}"
        )
    return path


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float] | None, dict[str, Any] | None]:
    """State dict in diffusers/peft naming (community formats converted by diffusers), network alphas,
    and the adapter metadata peft-trained files carry (lora_alpha: without it alpha != rank fuses wrong)."""
    from diffusers import StableDiffusionXLPipeline

    try:
        # use_safetensors=True: diffusers never falls back to torch.load (pickle) for this file.
        state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
            str(path), return_lora_metadata=True, use_safetensors=True
        )
    except Exception as exc:
        raise LoraError(f"{path}: not a readable SDXL LoRA ({exc})") from None
    return state, alphas, metadata


def check_lora(unet: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> LoraInfo:
    modules = dict(unet.named_modules())
    others = sorted({k.split(".")[0] for k in state if not k.startswith("unet.")})
    if others:
        raise LoraError(f"{path}: has layers for {', '.join(others)}; only UNet LoRAs are supported")
    ranks: set[int] = set()
    layers = 0
    for key, tensor in state.items():
        match = _LAYER.match(key)
        if match is None:
            continue
        name = match["module"]
        half = match["half"] or {"down": "A", "up": "B"}[match["updown"]]
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if weight is None:
            raise LoraError(f"{path}: '{name}' is not a module of this UNet (a LoRA for another base model?)")
        if half == "A":
            ranks.add(int(tensor.shape[0]))
            layers += 1
            if tensor.shape[1] != weight.shape[1]:
                raise LoraError(
                    f"{path}: '{name}' lora_A has shape {tuple(tensor.shape)} but the module takes "
                    f"{weight.shape[1]} inputs (a LoRA for another base model?)"
                )
        elif tensor.shape[0] != weight.shape[0]:
            raise LoraError(
                f"{path}: '{name}' lora_B has shape {tuple(tensor.shape)} but the module has "
                f"{weight.shape[0]} outputs (a LoRA for another base model?)"
            )
    if layers == 0:
        raise LoraError(f"{path}: no UNet LoRA layers found")
    if len(ranks) != 1:
        raise LoraError(f"{path}: inconsistent LoRA ranks {sorted(ranks)}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    weights = tuple(lora_weight_names(state))
    return LoraInfo(path=path, sha256=digest, rank=ranks.pop(), layers=layers, weights=weights)


def lora_weight_names(state: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
    """The UNet weights a LoRA changes when fused (`<prefix><module>.weight`), e.g. for the refit map."""
    modules = {m["module"] for m in map(_LAYER.match, state) if m is not None}
    return sorted(f"{prefix}{module}.weight" for module in modules)


def validate_loras(model_dir: Path, loras: dict[str, Path]) -> dict[str, LoraInfo]:
    """Check every family's LoRA against the folder's UNet before anything is exported."""
    unet = load_part(model_dir, "unet")
    infos = {}
    for family, lora in loras.items():
        path = lora_file(lora)
        infos[family] = check_lora(unet, read_lora(path)[0], path)
    return infos


def fused_unet(model_dir: Path, lora: Path, family: str) -> Any:
    """The model folder's UNet with the family LoRA fused in (scale 1), as a plain UNet."""
    path = lora_file(lora)
    unet = load_part(model_dir, "unet")
    state, alphas, metadata = read_lora(path)
    check_lora(unet, state, path)
    unet.load_lora_adapter(
        state, network_alphas=alphas, metadata=metadata, prefix="unet", adapter_name=family.lower()
    )
    unet.fuse_lora(lora_scale=1.0)
    unet.unload_lora()
    return unet.eval()
