"""Triton python model `bird_image`: the public entry point, a JSON request in, image + metadata out.

Thin adapter over birdgen.ensemble.pipeline.ImagePipeline, which runs the denoising loop and calls the
engine stages through BLS (so their dynamic batchers merge concurrent requests). `eink_buffer` holds
the packed panel buffer of a format=eink request (`image` is then its PNG preview), else is empty.
"""

# birdgen: bootstrap (export replaces this line with birdgen.triton_install.MODEL_BOOTSTRAP)

import json

import triton_python_backend_utils as pb_utils

from birdgen.contracts import EINK_BUFFER, ENTRY_INPUT, IMAGE, METADATA
from birdgen.ensemble.pipeline import ImagePipeline
from birdgen.ensemble.runners import entry_pipeline
from birdgen.ensemble.triton_model import bytes_tensor, read_bytes, respond_each
from birdgen.schema import parse_image_request


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.pipeline, _ = entry_pipeline(args, ImagePipeline)

    def execute(self, requests: list) -> list:
        return respond_each(pb_utils, requests, self._generate)

    def _generate(self, request: object) -> list:
        result = self.pipeline(parse_image_request(read_bytes(pb_utils, request, ENTRY_INPUT)))
        return [
            bytes_tensor(pb_utils, IMAGE, result.data),
            bytes_tensor(pb_utils, EINK_BUFFER, result.eink_buffer),
            bytes_tensor(pb_utils, METADATA, json.dumps(result.metadata, sort_keys=True)),
        ]
