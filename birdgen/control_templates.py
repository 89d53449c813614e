"""Control pictures drawn from a vocabulary pose: a bird skeleton (OpenPose style) or a depth map.

A request may guide a ControlNet with `{"template": "<pose>"}` instead of uploading a picture. The
templates are data, `data/control_templates.yaml`, validated at load: CUB-200-2011's 15 bird parts
as keypoints per pose (x, y in the unit square, y down, z = nearness 0..1), the limbs joining them
with OpenPose-style colours and widths, and per pose the depth shapes (ellipses, optionally
domed, and polygons). The poses are exactly the vocabulary's, so a new pose fails at load, not at
request time. Pictures are rasterised with numpy alone (no Pillow drawing), so their bytes depend
on numpy arithmetic only. No torch here. Docs: docs/controlnet.md (d).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from birdgen.contracts import CONTROLNET_KINDS
from birdgen.prompts import DATA_DIR, PromptLibrary, load_data_file

DEFAULT_TEMPLATES = DATA_DIR / "control_templates.yaml"
# CUB-200-2011's bird parts (its parts.txt, in anatomical order): every keypoint is one of these.
CUB_PARTS = (
    "beak",
    "forehead",
    "crown",
    "nape",
    "left_eye",
    "right_eye",
    "throat",
    "breast",
    "belly",
    "back",
    "left_wing",
    "right_wing",
    "tail",
    "left_leg",
    "right_leg",
)
OPENPOSE, DEPTH = CONTROLNET_KINDS

_Unit = Annotated[float, Field(ge=0, le=1)]
_Channel = Annotated[int, Field(ge=0, le=255)]
Colour = Annotated[list[_Channel], Field(min_length=3, max_length=3)]
Point = Annotated[list[_Unit], Field(min_length=2, max_length=2)]  # x, y: unit square, y down
Keypoint = Annotated[list[_Unit], Field(min_length=3, max_length=3)]  # x, y, z (nearness, 1 = nearest)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Limb(_Strict):
    """A line between two parts, drawn when the pose has both: its colour and its width (a fraction
    of the unit square's side)."""

    ends: Annotated[list[str], Field(min_length=2, max_length=2)]
    colour: Colour
    width: float = Field(gt=0, le=0.1)


class Ellipse(_Strict):
    """A depth ellipse: centre, radii (the first along `angle`, degrees counter-clockwise as seen), z.

    `falloff` domes it: z at the centre, z - falloff at the rim, round in between (a body, a head).
    """

    type: Literal["ellipse"]
    center: Point
    radii: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=2, max_length=2)]
    angle: float = Field(default=0, ge=-360, le=360)
    z: _Unit
    falloff: _Unit = 0

    @model_validator(mode="after")
    def _falloff_within_z(self) -> Ellipse:
        if self.falloff > self.z:
            raise ValueError(f"falloff {self.falloff} is above z {self.z} (a rim behind the background)")
        return self


class Polygon(_Strict):
    """A flat depth polygon (even-odd filled) at nearness z: a beak, a tail, a wing, a branch."""

    type: Literal["polygon"]
    points: Annotated[list[Point], Field(min_length=3)]
    z: _Unit


Shape = Annotated[Ellipse | Polygon, Field(discriminator="type")]


class PoseTemplate(_Strict):
    """One pose: its keypoints (parts may be missing, e.g. a portrait's legs) and its depth shapes."""

    keypoints: dict[str, Keypoint] = Field(min_length=2)
    shapes: list[Shape] = Field(min_length=1)


class ControlTemplates(_Strict):
    """The validated control_templates.yaml, and the renderer of its pictures."""

    parts: dict[str, Colour]  # CUB's parts, each with the colour of its keypoint disc
    keypoint_radius: float = Field(gt=0, le=0.1)  # of the discs, a fraction of the square's side
    limbs: list[Limb] = Field(min_length=1)
    poses: dict[str, PoseTemplate]

    @model_validator(mode="after")
    def _known_names(self) -> ControlTemplates:
        if set(self.parts) != set(CUB_PARTS):
            raise ValueError(
                f"parts must be CUB-200-2011's {len(CUB_PARTS)} ({', '.join(CUB_PARTS)}); "
                + _differences(self.parts, CUB_PARTS)
            )
        for i, limb in enumerate(self.limbs):
            for end in limb.ends:
                if end not in self.parts:
                    raise ValueError(f"limbs.{i}: unknown part {end!r}; allowed: {', '.join(CUB_PARTS)}")
            if limb.ends[0] == limb.ends[1]:
                raise ValueError(f"limbs.{i}: joins {limb.ends[0]!r} to itself")
        poses = PromptLibrary.load().allowed("pose")
        if set(self.poses) != set(poses):
            raise ValueError(
                f"poses must be exactly the vocabulary's ({', '.join(poses)}); "
                + _differences(self.poses, poses)
            )
        for name, pose in self.poses.items():
            for part in pose.keypoints:
                if part not in self.parts:
                    raise ValueError(
                        f"poses.{name}.keypoints: unknown part {part!r}; allowed: {', '.join(CUB_PARTS)}"
                    )
        return self

    @classmethod
    def load(cls, path: Path | None = None) -> ControlTemplates:
        """The templates from `path`, or the bundled ones (read once per process)."""
        return _load_default() if path is None else load_data_file(path, cls)

    def render(self, kind: str, pose: str, width: int, height: int) -> Image.Image:
        """The `kind` picture of `pose` as an RGB image of width × height: the unit square scaled
        uniformly to the shorter side and centred, the rest black (a bird is never stretched)."""
        return _frame(self.square(kind, pose, min(width, height)), width, height)

    def square(self, kind: str, pose: str, side: int) -> np.ndarray:
        """The unit square's picture at side × side pixels, uint8 (side, side, 3).

        openpose: limbs (capsules) then keypoints (discs) on black, each far to near by z. depth:
        grey = 255 · z, the nearest shape at each pixel (a z-buffer: near is bright, as in the
        MiDaS/DPT maps depth ControlNets are trained on), black background.
        """
        if kind not in CONTROLNET_KINDS:
            raise ValueError(f"unknown control kind {kind!r}; allowed: {', '.join(CONTROLNET_KINDS)}")
        if pose not in self.poses:
            raise ValueError(f"unknown pose {pose!r}; allowed: {', '.join(self.poses)}")
        if side < 1:
            raise ValueError(f"side must be at least 1 pixel, got {side}")
        template = self.poses[pose]
        if kind == OPENPOSE:
            return self._openpose(template, side)
        return self._depth(template, side)

    def _openpose(self, template: PoseTemplate, side: int) -> np.ndarray:
        canvas = np.zeros((side, side, 3), np.uint8)
        points = {part: (x * side, y * side, z) for part, (x, y, z) in template.keypoints.items()}
        limbs = [
            (points[a][2] + points[b][2], i, limb)
            for i, limb in enumerate(self.limbs)
            if (a := limb.ends[0]) in points and (b := limb.ends[1]) in points
        ]
        for _, _, limb in sorted(limbs, key=lambda item: item[:2]):
            (ax, ay, _), (bx, by, _) = points[limb.ends[0]], points[limb.ends[1]]
            _capsule(canvas, (ax, ay), (bx, by), max(limb.width * side / 2, 1.0), limb.colour)
        radius = max(self.keypoint_radius * side, 1.0)
        order = sorted(points, key=lambda part: (points[part][2], CUB_PARTS.index(part)))
        for part in order:
            x, y, _ = points[part]
            _capsule(canvas, (x, y), (x, y), radius, self.parts[part])
        return canvas

    def _depth(self, template: PoseTemplate, side: int) -> np.ndarray:
        depth = np.zeros((side, side), np.float64)
        for shape in template.shapes:
            if isinstance(shape, Ellipse):
                _ellipse(depth, shape, side)
            else:
                _polygon(depth, shape, side)
        grey = np.rint(depth * 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)


def _differences(got: Iterable[str], expected: Iterable[str]) -> str:
    unknown, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
    return f"unknown: {', '.join(unknown) or 'none'}, missing: {', '.join(missing) or 'none'}"


@functools.cache
def _load_default() -> ControlTemplates:
    return load_data_file(DEFAULT_TEMPLATES, ControlTemplates)


def render_template(kind: str, pose: str, width: int, height: int) -> Image.Image:
    """The bundled template's `kind` (openpose or depth) picture of the canonical `pose`, RGB,
    width × height: the pose's unit square scaled uniformly to the shorter side and centred on
    black. Deterministic; the square is cached per (kind, pose, side), and each call returns a
    new image, so a caller may change it."""
    return _frame(_cached_square(kind, pose, min(width, height)), width, height)


@functools.lru_cache(maxsize=32)
def _cached_square(kind: str, pose: str, side: int) -> np.ndarray:
    square = ControlTemplates.load().square(kind, pose, side)
    square.flags.writeable = False
    return square


def _frame(square: np.ndarray, width: int, height: int) -> Image.Image:
    """`square` centred in a black width × height RGB image."""
    if width < 1 or height < 1:
        raise ValueError(f"width and height must be at least 1 pixel, got {width} × {height}")
    side = square.shape[0]
    frame = np.zeros((height, width, 3), np.uint8)
    top, left = (height - side) // 2, (width - side) // 2
    frame[top : top + side, left : left + side] = square
    return Image.fromarray(frame)


def _window(side: int, lo: float, hi: float) -> slice:
    """The pixel indices whose centres (i + 0.5) may lie within lo..hi, clipped to the square."""
    return slice(max(math.floor(lo - 0.5), 0), min(math.ceil(hi + 0.5), side))


def _grid(rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres (x, y) of a window, broadcastable."""
    ys = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(cols.start, cols.stop, dtype=np.float64)[None, :] + 0.5
    return xs, ys


def _capsule(
    canvas: np.ndarray, a: tuple[float, float], b: tuple[float, float], radius: float, colour: list[int]
) -> None:
    """Paint the pixels within `radius` of the segment a..b (a disc when a == b), in pixel units."""
    side = canvas.shape[0]
    rows = _window(side, min(a[1], b[1]) - radius, max(a[1], b[1]) + radius)
    cols = _window(side, min(a[0], b[0]) - radius, max(a[0], b[0]) + radius)
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return
    xs, ys = _grid(rows, cols)
    dx, dy = b[0] - a[0], b[1] - a[1]
    length2 = dx * dx + dy * dy
    t = np.zeros(1) if length2 == 0 else np.clip(((xs - a[0]) * dx + (ys - a[1]) * dy) / length2, 0, 1)
    inside = (xs - a[0] - t * dx) ** 2 + (ys - a[1] - t * dy) ** 2 <= radius * radius
    canvas[rows, cols][inside] = colour


def _ellipse(depth: np.ndarray, shape: Ellipse, side: int) -> None:
    """Raise `depth` to the ellipse's nearness where it is nearer (a dome when it has a falloff)."""
    cx, cy = shape.center[0] * side, shape.center[1] * side
    rx, ry = shape.radii[0] * side, shape.radii[1] * side
    reach = max(rx, ry)
    rows, cols = _window(side, cy - reach, cy + reach), _window(side, cx - reach, cx + reach)
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return
    xs, ys = _grid(rows, cols)
    theta = math.radians(shape.angle)
    up = cy - ys  # y up, so the angle turns counter-clockwise as seen
    along = (xs - cx) * math.cos(theta) + up * math.sin(theta)
    across = -(xs - cx) * math.sin(theta) + up * math.cos(theta)
    r2 = (along / rx) ** 2 + (across / ry) ** 2
    inside = r2 <= 1
    z = shape.z - shape.falloff * (1 - np.sqrt(np.clip(1 - r2, 0, 1)))
    window = depth[rows, cols]
    np.maximum(window, np.where(inside, z, 0.0), out=window)


def _polygon(depth: np.ndarray, shape: Polygon, side: int) -> None:
    """Raise `depth` to the polygon's nearness inside it (even-odd rule on pixel centres)."""
    points = [(x * side, y * side) for x, y in shape.points]
    xs_all, ys_all = [p[0] for p in points], [p[1] for p in points]
    rows, cols = _window(side, min(ys_all), max(ys_all)), _window(side, min(xs_all), max(xs_all))
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return
    xs, ys = _grid(rows, cols)
    inside = np.zeros((rows.stop - rows.start, cols.stop - cols.start), bool)
    for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1], strict=True):
        if y1 == y2:
            continue  # a horizontal edge crosses no scanline through pixel centres
        crosses = (y1 > ys) != (y2 > ys)
        x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_at)
    window = depth[rows, cols]
    np.maximum(window, np.where(inside, shape.z, 0.0), out=window)
