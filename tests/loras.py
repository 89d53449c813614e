"""Random family LoRAs in the diffusers file format, for tests (training makes real ones)."""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def random_lora(
    model_dir: Path, out: Path, *, rank: int = 4, alpha: int | None = None, seed: int = 0, scale: float = 0.25
) -> Path:
    """A LoRA whose B matrices are random too, so it visibly changes the UNet (peft inits B to 0).

    Not much stronger than the default scale: at 0.5 the tiny motion UNet's temporal attention turns
    chaotic (a 1e-6 change of the input moved its output by 6e-3), so no float32 engine could agree
    with torch on it. Trained LoRAs are far gentler.
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from birdgen.model_folder import load_part

    torch.manual_seed(seed)
    unet = load_part(model_dir, "unet")
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, target_modules=TARGETS, init_lora_weights="gaussian"
    )
    unet.add_adapter(config)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # The adapter metadata carries lora_alpha, as birdgen train-lora writes it.
    StableDiffusionXLPipeline.save_lora_weights(
        out, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
    )
    return out
