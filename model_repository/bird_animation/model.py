"""Triton python model `bird_animation`: a JSON animation request in; WebP, GIF, poster PNG and metadata out.

Thin adapter over birdgen.ensemble.animation.AnimationPipeline (motion UNet and VAE through BLS).
A format the request did not ask for comes back as an empty string.
"""

# birdgen: bootstrap (export replaces this line with birdgen.server.MODEL_BOOTSTRAP)

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from birdgen.ensemble.animation import AnimationPipeline
from birdgen.ensemble.runners import BlsRunner
from birdgen.ensemble.triton_model import bytes_tensor, read_bytes, respond_each
from birdgen.schema import parse_animation_request
from birdgen.stages import repository_specs


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        info = json.loads((version_dir / "pipeline.json").read_text())
        self.max_frames = int(info["motion_max_frames"])
        self.pipeline = AnimationPipeline(version_dir, BlsRunner(repository_specs(info)))

    def execute(self, requests: list) -> list:
        return respond_each(pb_utils, requests, self._generate)

    def _generate(self, request: object) -> list:
        raw = read_bytes(pb_utils, request, "request")
        result = self.pipeline(parse_animation_request(raw, max_frames=self.max_frames))
        files = [
            bytes_tensor(pb_utils, name, result.files.get(name, b"")) for name in ("webp", "gif", "poster")
        ]
        return [*files, bytes_tensor(pb_utils, "metadata", json.dumps(result.metadata, sort_keys=True))]
