"""LoRA training on the tiny model: it learns, it resumes exactly, and what it writes loads in diffusers.

Kept small for 2 CPU cores: 64 px, rank 4, six synthetic photos, at most 40 steps per run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from birdgen.training.lora import TrainConfig, epoch_batches, list_checkpoints, train_lora
from tests.test_training_dataset import RESOLUTION, row, textured, write_jsonl


class Interrupted(Exception):
    """Stands in for a crash or a preempted job."""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rows = []
    for i in range(6):
        textured(96 + 8 * i, 80, 100 + i).save(folder / f"robin_{i}.png")
        rows.append(row(f"robin_{i}.png", licence="CC0" if i % 2 else "CC-BY-4.0"))
    textured(96, 96, 200).save(folder / "nc.png")
    rows.append(row("nc.png", licence="CC BY-NC 4.0"))
    write_jsonl(folder / "metadata.jsonl", rows)
    return folder


def config(tiny_model: Path, photos: Path, out: Path, **overrides: object) -> TrainConfig:
    base = TrainConfig(
        model_dir=tiny_model,
        data_dir=photos,
        output_dir=out,
        family="Passeriformes",
        rank=4,
        alpha=4,
        resolution=RESOLUTION,
        batch_size=2,
        max_steps=6,
        warmup_steps=1,
        lr=1e-3,
        checkpoint_every=3,
        keep_checkpoints=2,
        log_with="none",
        seed=7,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    assert epoch_batches(10, 2, seed=1, epoch=0) == epoch_batches(10, 2, seed=1, epoch=0)
    assert epoch_batches(10, 2, seed=1, epoch=0) != epoch_batches(10, 2, seed=1, epoch=1)
    # Two processes split each global batch and together cover what one process with batch 4 sees.
    one = epoch_batches(10, 4, seed=1, epoch=3)
    two = [epoch_batches(10, 2, seed=1, epoch=3, rank=r, world=2) for r in (0, 1)]
    assert [a + b for a, b in zip(*two, strict=True)] == one and len(one) == 2


def test_loss_decreases(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    result = train_lora(
        config(
            tiny_model,
            photos,
            tmp_path / "out",
            batch_size=4,
            max_steps=40,
            lr=1e-2,
            seed=0,
            checkpoint_every=100,
        )
    )
    losses = result.losses
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first - 0.03, (first, last)


def test_resume_continues_exactly(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    """Stopped after step 3 (right after its checkpoint) and resumed, a run's later losses and final
    weights equal an uninterrupted run's. grad_accum 2 over 3 micro-batches per epoch also makes the
    accumulation straddle epoch boundaries."""
    settings = {"grad_accum": 2, "checkpoint_every": 3}
    whole = train_lora(config(tiny_model, photos, tmp_path / "whole", **settings))

    def crash_after_3(step: int, loss: float) -> None:
        if step == 3:
            raise Interrupted

    crashed = config(tiny_model, photos, tmp_path / "crashed", **settings)
    with pytest.raises(Interrupted):
        train_lora(crashed, on_step=crash_after_3)
    assert [p.name for p in list_checkpoints(crashed.output_dir)] == ["step-0000003"]
    assert not (crashed.output_dir / "pytorch_lora_weights.safetensors").exists()

    resumed = train_lora(replace(crashed, resume="latest"))
    assert resumed.start_step == 3 and resumed.global_step == 6
    assert resumed.losses == pytest.approx(whole.losses[3:], abs=1e-6)
    a, b = load_file(whole.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    state = json.loads((crashed.output_dir / "checkpoints/step-0000003/birdgen_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (3, 2, 0)  # 6 micro / 3


def test_resume_refuses_a_checkpoint_with_other_batches(
    tiny_model: Path, photos: Path, tmp_path: Path
) -> None:
    first = config(tiny_model, photos, tmp_path / "out", max_steps=3, checkpoint_every=1)
    train_lora(first)
    checkpoint = list_checkpoints(first.output_dir)[-1]
    with pytest.raises(ValueError, match=r"invalid 'batch_size': got 1; allowed: 2, as in checkpoint"):
        train_lora(replace(first, batch_size=1, max_steps=4, resume=str(checkpoint)))
    with pytest.raises(ValueError, match="'resume'"):
        train_lora(replace(first, resume=str(tmp_path)))


def test_keeps_the_last_k_checkpoints(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    result = train_lora(config(tiny_model, photos, tmp_path / "out", checkpoint_every=1, keep_checkpoints=2))
    assert [p.name for p in result.checkpoints] == ["step-0000004", "step-0000005"]
    # Adapters only: a checkpoint holds the LoRA, never the frozen UNet.
    assert (result.checkpoints[-1] / "unet_lora.safetensors").is_file()
    assert not list(result.checkpoints[-1].glob("model*.safetensors"))


def test_lora_loads_in_diffusers_and_changes_the_unet(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    result = train_lora(config(tiny_model, photos, tmp_path / "out", rank=4, alpha=8, max_steps=4, lr=1e-2))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, RESOLUTION // 8, RESOLUTION // 8, generator=generator)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    added = {"text_embeds": torch.randn(1, 40, generator=generator), "time_ids": torch.tensor([[64.0] * 6])}
    with torch.no_grad():
        before = unet(sample, 500, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        pipe.load_lora_weights(result.output_dir)
        after = unet(sample, 500, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    assert not torch.allclose(before, after, atol=1e-5)
    (adapter,) = unet.peft_config.values()
    assert (adapter.r, adapter.lora_alpha) == (4, 8)  # alpha != rank survives (stored as metadata)
    assert sorted(set(adapter.target_modules)) == ["to_k", "to_out.0", "to_q", "to_v"]


def test_training_card_and_attribution(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    result = train_lora(config(tiny_model, photos, tmp_path / "out", max_steps=2, log_with="tensorboard"))
    out = result.output_dir
    card = json.loads((out / "training_card.json").read_text())
    assert card["family"] == "Passeriformes"
    assert card["lora"] | {"target_modules": None} == {
        "file": "pytorch_lora_weights.safetensors",
        "rank": 4,
        "alpha": 4,
        "dropout": 0.0,
        "target_modules": None,
    }
    assert (card["data"]["accepted"], card["data"]["rejected"]) == (6, 1)
    assert card["data"]["rejections"][0]["file"] == "nc.png"
    assert card["result"]["steps"] == 2 and card["result"]["final_loss"] == result.losses[-1]
    assert card["config"]["lr"] == 1e-3 and card["config"]["model_dir"] == str(tiny_model)
    assert len(card["attribution"]) == 6
    attribution = json.loads((out / "attribution.json").read_text())
    assert attribution == card["attribution"]
    assert {a["licence"] for a in attribution} == {"CC0", "CC-BY-4.0"}
    assert "robin_5.png" in (out / "ATTRIBUTION.md").read_text()
    assert "Passeriformes" in (out / "training_card.md").read_text()
    assert list((out / "logs").rglob("events.out.tfevents.*")), "TensorBoard is the default logger"


def test_bad_settings_name_the_field(tiny_model: Path, photos: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"invalid 'resolution': got 80; allowed: a multiple of 32"):
        train_lora(config(tiny_model, photos, tmp_path / "a", resolution=80))
    with pytest.raises(ValueError, match="'mixed_precision'"):
        train_lora(config(tiny_model, photos, tmp_path / "b", mixed_precision="fp8"))
    with pytest.raises(ValueError, match=r"0 usable photos.*7 licence"):
        train_lora(config(tiny_model, photos, tmp_path / "c", licences=("PDM",), family=None))


def test_cli_train_lora(
    tiny_model: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from birdgen.cli import main

    out = tmp_path / "cli"
    args = ["train-lora", "--model-dir", str(tiny_model), "--data", str(photos), "--family", "Passeriformes"]
    args += ["--output", str(out), "--rank", "4", "--alpha", "4", "--resolution", "64", "--batch-size", "2"]
    args += ["--max-steps", "2", "--warmup-steps", "0", "--log-with", "none", "--resume", "latest"]
    assert main(args) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert "6 photos" in capsys.readouterr().out
    assert main([*args, "--resolution", "80"]) == 2


def test_logger_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorBoard by default when installed, else a warning and no logger; W&B / MLflow only on request."""
    import importlib.util

    from birdgen.training import lora

    assert lora._tracker("none") is None
    assert lora._tracker("tensorboard") == "tensorboard"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.warns(UserWarning, match="tensorboard is not installed"):
        assert lora._tracker("tensorboard") is None
    with pytest.raises(ValueError, match="wandb is not installed"):
        lora._tracker("wandb")


def test_photos_to_a_routed_family_engine(
    tiny_model: Path, photos: Path, repository: Path, tmp_path: Path
) -> None:
    """The MLE path of the README: train-lora, then export --lora, then the family draws its species."""
    import shutil

    from birdgen.cli import main
    from birdgen.ensemble.pipeline import ImagePipeline
    from birdgen.ensemble.runners import LocalRunner
    from birdgen.schema import ImageRequest
    from tests.conftest import ROBIN

    run = tmp_path / "runs" / "passeriformes"
    train = ["train-lora", "--model-dir", str(tiny_model), "--data", str(photos), "--family", "Passeriformes"]
    train += ["--output", str(run), "--rank", "4", "--alpha", "4", "--resolution", "64", "--batch-size", "2"]
    assert main([*train, "--max-steps", "2", "--warmup-steps", "0", "--log-with", "none"]) == 0
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    assert (
        main(["export", "--model-dir", str(tiny_model), "--out", str(repo), "--lora", f"Passeriformes={run}"])
        == 0
    )

    manifest = json.loads((repo / "manifest.json").read_text())
    trained = manifest["families"]["Passeriformes"]
    assert trained["model"] == "unet_passeriformes" and trained["lora"]["source"] == str(
        run / "pytorch_lora_weights.safetensors"
    )
    entry = max(int(p.name) for p in (repo / "bird_image").iterdir() if p.name.isdigit())
    image = ImagePipeline(repo / "bird_image" / str(entry), LocalRunner(repo))(ImageRequest(**ROBIN))
    assert image.metadata["unet"] == {"model": "unet_passeriformes", "version": 1}
    assert image.metadata["lora"]["sha256"] == trained["lora"]["sha256"]
