"""Triton python model for one engine stage (text_encoder, text_encoder_2, unet, vae_decoder).

Thin adapter: the stage and engine kind come from config.pbtxt parameters; the logic lives in
birdgen.ensemble.triton_model.
"""

# birdgen: bootstrap (export replaces this line with birdgen.triton_install.MODEL_BOOTSTRAP)

import triton_python_backend_utils as pb_utils

from birdgen.ensemble.triton_model import engine_seconds_metric, load_stage, run_batched, timed


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.spec, engine = load_stage(args)
        self.metric_family, metric = engine_seconds_metric(pb_utils, args)
        self.engine = timed(engine, metric.increment)

    def finalize(self) -> None:
        del self.engine  # its metric first, then the family
        del self.metric_family

    def execute(self, requests: list) -> list:
        return run_batched(pb_utils, self.spec, self.engine, requests)
