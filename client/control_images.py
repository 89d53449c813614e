"""Client pictures as a caller gives them (an image request's control images, an svd animation's
`image`): files and bytes become base64 text, and every picture is decoded here first, as the entry
model will decode it.

Why its own module: these are the request fields the client transforms before validating, and the
ones it checks beyond the schema (the schema checks the base64 syntax and size; decoding the picture
is input_image's). Docs: docs/client.md, docs/controlnet.md, docs/svd.md.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from birdgen.client.errors import InvalidRequestError
from birdgen.control import ControlSettings
from birdgen.input_image import allowed as allowed_image
from birdgen.input_image import decode_input_image_base64
from birdgen.request_error import RequestError
from birdgen.schema import AnimationRequest

# A picture as a caller may give it: a file (a Path), its bytes, or base64 text (as sent).
ControlImage = str | bytes | bytearray | memoryview | os.PathLike[str]
# The field of an svd animation request that carries the picture to animate.
ANIMATION_IMAGE = "image"


def encode_control_images(data: Any) -> Any:
    """`data` with each control image given as a file (Path) or bytes replaced by its base64 text;
    anything else (an ImageRequest, base64 text, a wrong type for the schema to name) unchanged.
    A file that cannot be read is an InvalidRequestError naming control.<kind>.image."""
    if not isinstance(data, Mapping) or not isinstance(data.get("control"), Mapping):
        return data
    control = dict(data["control"])
    for kind, setting in control.items():
        image = setting.get("image") if isinstance(setting, Mapping) else None
        if isinstance(image, bytes | bytearray | memoryview | os.PathLike):
            name = kind.strip().lower() if isinstance(kind, str) else kind  # as the schema names it
            control[kind] = {**setting, "image": _base64_image(f"control.{name}.image", image)}
    return {**data, "control": control}


def encode_animation_image(data: Any) -> Any:
    """`data` with an animation's `image` given as a file (Path) or bytes replaced by its base64
    text; anything else (an AnimationRequest, base64 text, null, a wrong type for the schema to name)
    unchanged. A file that cannot be read is an InvalidRequestError naming `image`."""
    if not isinstance(data, Mapping):
        return data
    image = data.get(ANIMATION_IMAGE)
    if not isinstance(image, bytes | bytearray | memoryview | os.PathLike):
        return data
    return {**data, ANIMATION_IMAGE: _base64_image(ANIMATION_IMAGE, image)}


def _base64_image(field: str, image: bytes | bytearray | memoryview | os.PathLike[str]) -> str:
    if isinstance(image, os.PathLike):
        try:
            image = Path(image).read_bytes()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__  # RequestError's form, the whole path kept
            got = f"cannot read {os.fspath(image)} ({reason})"
            raise InvalidRequestError(f"invalid {field!r}: {got}; allowed: {allowed_image('file')}") from None
    return base64.b64encode(image).decode("ascii")


def check_control_image(setting: ControlSettings, width: int, height: int) -> None:
    """Decode `setting`'s image as the entry model does (input_image.decode_input_image_base64, naming
    control.<kind>.image, at the request's size); InvalidRequestError with the server's message else."""
    if setting.image is None:
        return
    try:
        decode_input_image_base64(setting.image, setting.image_field, width, height)
    except RequestError as exc:
        raise InvalidRequestError(str(exc)) from None


def check_animation_image(request: AnimationRequest) -> None:
    """Decode an svd request's `image` as the entry model does (input_image.decode_input_image_base64,
    naming `image`, at the picture's own size: SVD's encoders resize it themselves); InvalidRequestError
    with the server's message else. Nothing to do without an image (an animatediff request, or an svd
    one whose still the server draws)."""
    if request.image is None:
        return
    try:
        decode_input_image_base64(request.image.text, ANIMATION_IMAGE)
    except RequestError as exc:
        raise InvalidRequestError(str(exc)) from None
