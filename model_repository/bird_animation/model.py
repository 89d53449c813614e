"""Triton python model `bird_animation`: a JSON animation request in; WebP, GIF, poster PNG and metadata out.

Thin adapter over birdgen.ensemble.animation.AnimationPipeline (motion UNet and VAE through BLS).
A format the request did not ask for comes back as an empty string.
"""

# birdgen: bootstrap (export replaces this line with birdgen.triton_install.MODEL_BOOTSTRAP)

import json

import triton_python_backend_utils as pb_utils

from birdgen.contracts import ANIMATION_FILES, ENTRY_INPUT, METADATA
from birdgen.ensemble.animation import AnimationPipeline
from birdgen.ensemble.runners import entry_pipeline
from birdgen.ensemble.triton_model import bytes_tensor, read_bytes, respond_each
from birdgen.schema import parse_animation_request


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.pipeline, info = entry_pipeline(args, AnimationPipeline)
        self.max_frames = int(info["motion_max_frames"]) or None  # None: AnimateDiff not exported

    def execute(self, requests: list) -> list:
        return respond_each(pb_utils, requests, self._generate)

    def _generate(self, request: object) -> list:
        raw = read_bytes(pb_utils, request, ENTRY_INPUT)
        result = self.pipeline(parse_animation_request(raw, max_frames=self.max_frames))
        files = [bytes_tensor(pb_utils, name, result.files.get(name, b"")) for name in ANIMATION_FILES]
        return [*files, bytes_tensor(pb_utils, METADATA, json.dumps(result.metadata, sort_keys=True))]
