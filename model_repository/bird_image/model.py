"""Triton python model `bird_image`: the public entry point, a JSON request in, image + metadata out.

Thin adapter over birdgen.ensemble.pipeline.ImagePipeline, which runs the denoising loop and calls the
engine stages through BLS (so their dynamic batchers merge concurrent requests).
"""

import os
import site
import sys


def _use_birdgen_site() -> None:
    """The python-backend stub ignores PYTHONPATH; BIRDGEN_SITE names the venv's site-packages."""
    before = list(sys.path)
    for path in filter(None, os.environ.get("BIRDGEN_SITE", "").split(os.pathsep)):
        site.addsitedir(path)
    sys.path[:] = [p for p in sys.path if p not in before] + before


_use_birdgen_site()

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import triton_python_backend_utils as pb_utils  # noqa: E402

from birdgen.ensemble.pipeline import ImagePipeline  # noqa: E402
from birdgen.ensemble.runners import BlsRunner  # noqa: E402
from birdgen.ensemble.triton_model import bytes_tensor, read_bytes, respond_each  # noqa: E402
from birdgen.model_folder import ModelDims  # noqa: E402
from birdgen.schema import parse_image_request  # noqa: E402
from birdgen.stages import stage_specs  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        dims = ModelDims.from_dict(json.loads((version_dir / "pipeline.json").read_text())["dims"])
        self.pipeline = ImagePipeline(version_dir, BlsRunner(stage_specs(dims)))

    def execute(self, requests: list) -> list:
        return respond_each(pb_utils, requests, self._generate)

    def _generate(self, request: object) -> list:
        result = self.pipeline(parse_image_request(read_bytes(pb_utils, request, "request")))
        return [
            bytes_tensor(pb_utils, "image", result.data),
            bytes_tensor(pb_utils, "metadata", json.dumps(result.metadata, sort_keys=True)),
        ]
