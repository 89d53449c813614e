"""ControlNet templates (docs/controlnet.md (d)): the data file is checked at load, and every pose
renders, for both kinds, at any request size, deterministically and without stretching the bird."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from birdgen.contracts import CONTROLNET_KINDS
from birdgen.control_templates import (
    CUB_PARTS,
    DEFAULT_TEMPLATES,
    ControlTemplates,
    render_template,
)
from birdgen.prompts import DataFileError, PromptLibrary

POSES = PromptLibrary.load().allowed("pose")
SIZES = [(256, 256), (512, 512), (2048, 256)]


def test_the_bundled_file_has_cub_parts_and_exactly_the_vocabulary_poses() -> None:
    templates = ControlTemplates.load()
    assert ControlTemplates.load() is templates
    assert tuple(templates.parts) == CUB_PARTS and len(CUB_PARTS) == 15
    assert list(templates.poses) == POSES
    for name, pose in templates.poses.items():
        assert {"beak", "crown", "back"} <= set(pose.keypoints), name
    assert "left_leg" not in templates.poses["portrait"].keypoints  # parts may be missing
    assert "left_wing" in templates.poses["flying"].keypoints  # spread wings: both show


@pytest.mark.parametrize("kind", CONTROLNET_KINDS)
def test_every_pose_renders_at_every_size_deterministically(kind: str) -> None:
    for pose in POSES:
        for width, height in SIZES:
            image = render_template(kind, pose, width, height)
            assert (image.mode, image.size) == ("RGB", (width, height))
            pixels = np.asarray(image)
            lit = pixels.any(axis=2)
            side = min(width, height)
            left = (width - side) // 2
            assert lit[:, left : left + side].mean() > 0.01, (kind, pose, width, height)  # not a speck
            # The square is centred and nothing is drawn outside it: at 2048 × 256 the bird is 256 wide.
            assert not lit[:, :left].any() and not lit[:, left + side :].any()
            assert np.array_equal(
                pixels, np.asarray(ControlTemplates.load().render(kind, pose, width, height))
            )
            if kind == "depth":
                assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_the_frame_is_the_square_centred_and_a_new_image_each_call() -> None:
    square = np.asarray(render_template("openpose", "perched", 256, 256))
    wide = np.asarray(render_template("openpose", "perched", 2048, 256))
    tall = np.asarray(render_template("openpose", "perched", 256, 1024))
    assert np.array_equal(wide[:, 896:1152], square) and np.array_equal(tall[384:640], square)
    first = render_template("depth", "flying", 256, 256)
    first.paste((255, 255, 255), (0, 0, 256, 256))  # a caller may change its copy...
    assert np.asarray(render_template("depth", "flying", 256, 256)).mean() < 255  # ...not the cache


def test_openpose_draws_the_skeleton_colours_and_depth_puts_the_near_wing_in_front() -> None:
    templates = ControlTemplates.load()
    pixels = np.asarray(render_template("openpose", "flying", 512, 512))
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert {tuple(templates.parts[p]) for p in templates.poses["flying"].keypoints} <= colours
    assert tuple(templates.limbs[0].colour) in colours
    depth = np.asarray(render_template("depth", "flying", 512, 512))[..., 0]
    near_wing = templates.poses["flying"].keypoints["right_wing"]
    far_wing = templates.poses["flying"].keypoints["left_wing"]
    at = lambda p: int(depth[int(p[1] * 512), int(p[0] * 512)])  # noqa: E731
    assert at(near_wing) > at(far_wing) > 0  # near is bright, the background black
    assert depth[0, 0] == 0


def test_unknown_kind_or_pose_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown control kind 'canny'; allowed: openpose, depth"):
        render_template("canny", "perched", 256, 256)
    with pytest.raises(ValueError, match="unknown pose 'Perched'"):
        render_template("depth", "Perched", 256, 256)


BROKEN = [
    # (text in the bundled file, its replacement, words the load error must contain)
    (
        "      right_wing: [0.43, 0.5, 0.9]\n",
        "      wingtip: [0.43, 0.5, 0.9]\n",
        "poses.perched.keypoints: unknown part 'wingtip'",
    ),
    ("{ends: [beak, forehead],", "{ends: [bill, forehead],", "limbs.0: unknown part 'bill'"),
    ("  left_eye: [170, 255, 0]\n", "  eye: [170, 255, 0]\n", "unknown: eye, missing: left_eye"),
    ("  portrait:  #", "  close-up:  #", "unknown: close-up, missing: portrait"),
    ("  beak: [255, 0, 0]\n", "  beak: [256, 0, 0]\n", "parts.beak.0"),
    ("      beak: [0.71, 0.28, 0.8]\n", "      beak: [1.71, 0.28, 0.8]\n", "poses.perched.keypoints.beak.0"),
    ("      beak: [0.71, 0.28, 0.8]\n", "      beak: [0.71, 0.28]\n", "poses.perched.keypoints.beak"),
    (
        "radii: [0.19, 0.12], angle: 62, z: 0.75, falloff: 0.25}",
        "radii: [0.19, 0.12], angle: 62, z: 0.75, falloff: 0.9}  #",
        "falloff 0.9 is above z",
    ),
    (
        "{type: polygon, points: [[0.655, 0.25]",
        "{type: square, points: [[0.655, 0.25]",
        "poses.perched.shapes.4",
    ),
]


@pytest.mark.parametrize(("old", "new", "named"), BROKEN)
def test_a_broken_template_file_is_refused_at_load(tmp_path: Path, old: str, new: str, named: str) -> None:
    text = DEFAULT_TEMPLATES.read_text()
    assert text.count(old) >= 1, old
    path = tmp_path / "control_templates.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(DataFileError, match=re.escape(named)):
        ControlTemplates.load(path)


def test_a_missing_pose_is_refused_at_load(tmp_path: Path) -> None:
    text = DEFAULT_TEMPLATES.read_text()
    path = tmp_path / "control_templates.yaml"
    path.write_text(text[: text.index("  portrait:")])
    with pytest.raises(DataFileError, match=re.escape("unknown: none, missing: portrait")):
        ControlTemplates.load(path)
    path.write_text(text)
    assert ControlTemplates.load(path) == ControlTemplates.load()
