"""BRISQUE and sharpness rank pictures the way a viewer would: a real photograph above the same
photograph blurred, and (BRISQUE) above it blurred and noised."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from birdgen.qa import measures

skimage_data = pytest.importorskip("skimage.data")


def photographs() -> list[Image.Image]:
    """Natural photographs that ship inside scikit-image (no download): a cat, coffee, a portrait."""
    return [Image.fromarray(getattr(skimage_data, name)()) for name in ("chelsea", "coffee", "astronaut")]


def blurred(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(2))


def blurred_and_noised(image: Image.Image, seed: int = 0) -> Image.Image:
    pixels = np.asarray(blurred(image), dtype=np.float64)
    noise = np.random.default_rng(seed).normal(0.0, 12.0, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def natural_statistics(side: int = 256, seed: int = 0) -> Image.Image:
    """1/f noise: the power spectrum of natural scenes, with no photograph needed."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(side), np.fft.fftfreq(side), indexing="ij")
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=(side, side)) + 1j * rng.normal(size=(side, side))) / radius
    field = np.real(np.fft.ifft2(spectrum))
    grey = (255 * (field - field.min()) / (field.max() - field.min())).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


@pytest.mark.parametrize(
    "image", [*photographs(), natural_statistics()], ids=["cat", "coffee", "astronaut", "1/f"]
)
def test_brisque_ranks_the_sharp_picture_better_than_it_blurred_or_blurred_and_noised(
    image: Image.Image,
) -> None:
    sharp = measures.brisque(image)
    assert sharp < measures.brisque(blurred(image)) - 10
    assert sharp < measures.brisque(blurred_and_noised(image))


@pytest.mark.parametrize(
    "image", [*photographs(), natural_statistics()], ids=["cat", "coffee", "astronaut", "1/f"]
)
def test_sharpness_ranks_the_sharp_picture_above_it_blurred(image: Image.Image) -> None:
    assert measures.sharpness(image) > 10 * measures.sharpness(blurred(image))


def test_the_bundled_thresholds_pass_a_photograph_and_fail_it_blurred() -> None:
    """data/qa.yaml's gates on real photographs: the point of the numbers."""
    from birdgen.qa_config import QaConfig

    gates = QaConfig.load().gates
    for image in photographs():
        assert (
            measures.brisque(image) <= gates.brisque_max and measures.sharpness(image) >= gates.sharpness_min
        )
        soft = blurred(image)
        assert measures.brisque(soft) > gates.brisque_max and measures.sharpness(soft) < gates.sharpness_min


def test_measures_take_any_pil_mode_and_refuse_a_picture_too_small_to_measure() -> None:
    image = photographs()[0]
    assert measures.brisque(image.convert("RGBA")) == pytest.approx(measures.brisque(image))
    assert measures.sharpness(image.convert("L")) == pytest.approx(measures.sharpness(image), rel=0.05)
    with pytest.raises(ValueError, match="at least 32 px"):
        measures.sharpness(image.resize((16, 16)))
