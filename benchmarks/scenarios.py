"""What the benchmark asks for: named scenarios, each one request shape at one size and step count.

The request fields are fixed except the seed, which the load generator makes distinct per request so
that Triton's response cache never answers (a benchmark of a cache hit is the `cached` scenario).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

WORK_DIR = Path("outputs/bench")  # built models and repositories

Kind = Literal["image", "animation", "cached"]
# The demo's robin (birdgen.cli.DEMO_REQUEST).
_BIRD = {
    "species": "American Robin",
    "scientific_name": "Turdus migratorius",
    "species_id": "amerob",
    "season": "spring",
    "lighting": "golden-hour",
}


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: Kind
    size: int  # width = height, pixels
    steps: int
    frames: int = 0  # animations: duration_seconds x fps

    def request(self, seed: int) -> dict[str, Any]:
        """The request fields for one seed (an AnimationRequest's for animations)."""
        fields = {**_BIRD, "width": self.size, "height": self.size, "steps": self.steps, "seed": seed}
        if self.kind == "animation":
            # 8 fps, the default rate: frames / 8 seconds. WebP only: the GIF fallback is a client's choice.
            return {
                **fields,
                "behaviour": "flying",
                "fps": 8,
                "duration_seconds": self.frames // 8,
                "format": "webp",
            }
        return {**fields, "pose": "perched", "format": "png"}


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("image-256-1step", "image", 256, 1),
        Scenario("image-256-4step", "image", 256, 4),
        Scenario("image-512-1step", "image", 512, 1),
        Scenario("image-512-4step", "image", 512, 4),
        Scenario("image-1024-1step", "image", 1024, 1),
        Scenario("animation-16f-256-1step", "animation", 256, 1, frames=16),
        Scenario("animation-16f-512-4step", "animation", 512, 4, frames=16),
        # Repeats of a 512 px 1-step image, answered by the Redis response cache.
        Scenario("cached", "cached", 512, 1),
    )
}
# The GPU set and levels, and the CPU ones sized for the `mini` preset on a few cores.
GPU_SCENARIOS = (
    "image-512-1step",
    "image-512-4step",
    "image-1024-1step",
    "animation-16f-512-4step",
    "cached",
)
CPU_SCENARIOS = ("image-256-1step", "image-512-1step", "animation-16f-256-1step", "cached")
GPU_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
CPU_CONCURRENCY = (1, 2, 4, 8)
BASELINE_MODES = ("eager", "compile")  # diffusers as a user runs it: as is, and under torch.compile


def parse_scenarios(text: str) -> list[Scenario]:
    """A comma-separated list of scenario names, in the order given."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise ValueError(f"invalid 'scenarios': got {text!r}; allowed: {', '.join(SCENARIOS)}")
    return [SCENARIOS[n] for n in names]
