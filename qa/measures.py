"""No-reference image quality: BRISQUE and sharpness (variance of the Laplacian).

Both are the field's own implementations: BRISQUE is the `brisque` package's (the LIVE-trained SVR
of Mittal et al. that ships inside the package, so nothing is downloaded), the Laplacian OpenCV's.
Lower BRISQUE is better; higher sharpness is sharper. Noise raises the Laplacian's variance as much
as detail does, so a noisy picture can pass the sharpness gate: BRISQUE is the gate that catches it.
No torch here.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any

import cv2
import numpy as np
from PIL import Image

# BRISQUE's features need a few pixels per window at half size; smaller pictures are refused.
MIN_SIDE = 32
# libsvm's model loading (and its C state) is not thread-safe; QA checks run in worker threads.
_LIBSVM = threading.Lock()


def rgb_array(image: Image.Image) -> np.ndarray:
    """8-bit RGB pixels of `image` (alpha dropped, palette and grey converted)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if min(array.shape[:2]) < MIN_SIDE:
        raise ValueError(f"image is {array.shape[1]}x{array.shape[0]}; quality needs at least {MIN_SIDE} px")
    return array


@functools.cache
def _brisque() -> Any:
    with warnings.catch_warnings():  # the package imports scipy's deprecated ndimage.filters
        warnings.simplefilter("ignore", DeprecationWarning)
        from brisque import BRISQUE

    return BRISQUE(url=False)


def brisque(image: Image.Image) -> float:
    """BRISQUE score, lower is better (about 0-100 on natural photos; blur and noise raise it)."""
    pixels = rgb_array(image)
    with _LIBSVM, warnings.catch_warnings():  # the package's own NumPy-scalar conversions
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(_brisque().score(pixels))


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of the 8-bit grey picture: low when edges are soft (blur)."""
    return laplacian_variance(cv2.cvtColor(rgb_array(image), cv2.COLOR_RGB2GRAY))


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of OpenCV's 4-neighbour Laplacian of a grey picture (0..255 levels): the usual focus
    measure, low when blurry or featureless. Also the training photos' sharpness gate."""
    return float(cv2.Laplacian(np.asarray(grey, dtype=np.float64), cv2.CV_64F).var()) if grey.size else 0.0
