"""Triton python model for one engine stage (text_encoder, text_encoder_2, unet, vae_decoder).

Thin adapter: the stage and engine kind come from config.pbtxt parameters; the logic lives in
birdgen.ensemble.triton_model.
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

import triton_python_backend_utils as pb_utils  # noqa: E402

from birdgen.ensemble.triton_model import load_stage, run_batched  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.spec, self.engine = load_stage(args)

    def execute(self, requests: list) -> list:
        return run_batched(pb_utils, self.spec, self.engine, requests)
