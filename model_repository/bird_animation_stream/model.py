"""Triton python model `bird_animation_stream`: `bird_animation` with progress, as a decoupled model.

Each denoising step and each decoded chunk sends a response with a JSON `progress` message
({"stage", "done", "total"}); the last response carries the files and metadata and closes the
stream. Clients need gRPC streaming for it (BirdClient.generate_animation(on_progress=...)).
"""

# birdgen: bootstrap (export replaces this line with birdgen.triton_install.MODEL_BOOTSTRAP)

import json

import triton_python_backend_utils as pb_utils

from birdgen.contracts import ANIMATION_FILES, ENTRY_INPUT, METADATA, PROGRESS
from birdgen.ensemble.animation import AnimationPipeline
from birdgen.ensemble.runners import entry_pipeline
from birdgen.ensemble.triton_model import bytes_tensor, error_response, read_bytes
from birdgen.schema import parse_animation_request

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.pipeline, info = entry_pipeline(args, AnimationPipeline)
        self.max_frames = int(info["motion_max_frames"]) or None  # None: AnimateDiff not exported

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                sender.send(self._generate(request, sender), flags=FINAL)
            except Exception as exc:  # every failure ends that request's stream with its error
                sender.send(error_response(pb_utils, exc), flags=FINAL)

    def _generate(self, request: object, sender: object) -> object:
        def progress(stage: str, done: int, total: int) -> None:
            message = json.dumps({"stage": stage, "done": done, "total": total})
            sender.send(
                pb_utils.InferenceResponse(output_tensors=[bytes_tensor(pb_utils, PROGRESS, message)])
            )

        raw = read_bytes(pb_utils, request, ENTRY_INPUT)
        result = self.pipeline(parse_animation_request(raw, max_frames=self.max_frames), progress)
        files = [bytes_tensor(pb_utils, name, result.files.get(name, b"")) for name in ANIMATION_FILES]
        metadata = bytes_tensor(pb_utils, METADATA, json.dumps(result.metadata, sort_keys=True))
        return pb_utils.InferenceResponse(output_tensors=[*files, metadata])
