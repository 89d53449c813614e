"""`BirdClient`: the platform backend's way to ask birdgen for a bird, over Triton gRPC.

Thin on purpose: no torch. The request is validated with the same schema the server uses before
anything is sent, so a bad request fails fast with the same message the server would give.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from birdgen.client.errors import (
    BirdgenError,
    DeadlineExceededError,
    GenerationError,
    InvalidRequestError,
    ServerUnavailableError,
)
from birdgen.ensemble.routing import MOTION_UNET, family_of
from birdgen.ensemble.routing import family_model as family_model_name
from birdgen.schema import (
    AnimationRequest,
    ImageRequest,
    RequestError,
    parse_animation_request,
    parse_image_request,
)

IMAGE_MODEL = "bird_image"
ANIMATION_MODEL = "bird_animation"
ANIMATION_STREAM_MODEL = "bird_animation_stream"


@dataclass(frozen=True)
class GeneratedImage:
    """An encoded image with its generation metadata (also embedded in the file)."""

    data: bytes
    format: str
    metadata: dict[str, Any]

    @cached_property
    def image(self) -> Image.Image:
        image = Image.open(BytesIO(self.data))
        image.load()
        return image

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class GeneratedAnimation:
    """An animation as animated WebP and/or GIF, a PNG poster frame, and the generation metadata."""

    files: dict[str, bytes]  # "webp", "gif" (those asked for) and "poster"
    metadata: dict[str, Any]

    def save(
        self, path: str | Path, *, gif: str | Path | None = None, poster: str | Path | None = None
    ) -> list[Path]:
        """Write the WebP (or the GIF, when only that was made) to `path`, and the others if asked."""
        main = "webp" if "webp" in self.files else "gif"
        targets = [(main, path)] + [
            (name, p) for name, p in (("gif", gif), ("poster", poster)) if p is not None
        ]
        written = []
        for name, target in targets:
            if name not in self.files:
                raise ValueError(f"no {name} in this animation (format was {self.metadata.get('format')!r})")
            target = Path(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.files[name])
            written.append(target)
        return written


class BirdClient:
    """Synchronous client; one gRPC channel reused across calls."""

    def __init__(self, url: str = "localhost:8001", *, timeout_s: float = 120.0) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url
        self.timeout_s = timeout_s
        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url=url)

    def generate_image(
        self, request: ImageRequest | Mapping[str, Any] | None = None, **fields: Any
    ) -> GeneratedImage:
        """Generate one image. Pass an ImageRequest, a mapping, or the fields as keywords."""
        try:
            parsed = parse_image_request(request if request is not None else fields)
        except RequestError as exc:
            raise InvalidRequestError(str(exc)) from None
        outputs = self._infer(IMAGE_MODEL, parsed.canonical_json(), ("image", "metadata"))
        metadata = json.loads(outputs["metadata"])
        return GeneratedImage(outputs["image"], metadata["format"], metadata)

    def generate_animation(
        self,
        request: AnimationRequest | Mapping[str, Any] | None = None,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        **fields: Any,
    ) -> GeneratedAnimation:
        """Generate one clip (behaviour, duration_seconds, fps, format webp|gif|both, ...).

        With `on_progress`, the call streams from `bird_animation_stream` and hands each progress
        message ({"stage": "denoise" | "decode", "done", "total"}) to it before returning the clip.
        """
        try:
            parsed = parse_animation_request(request if request is not None else fields)
        except RequestError as exc:
            raise InvalidRequestError(str(exc)) from None
        names = ("webp", "gif", "poster", "metadata")
        if on_progress is None:
            outputs = self._infer(ANIMATION_MODEL, parsed.canonical_json(), names)
        else:
            outputs = self._stream(ANIMATION_STREAM_MODEL, parsed.canonical_json(), names, on_progress)
        metadata = json.loads(outputs.pop("metadata"))
        return GeneratedAnimation({name: data for name, data in outputs.items() if data}, metadata)

    def _infer(self, model: str, request_json: str, outputs: tuple[str, ...]) -> dict[str, bytes]:
        from tritonclient.utils import InferenceServerException

        grpc = self._grpc
        tensor = grpc.InferInput("request", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([request_json.encode()], dtype=np.object_))
        try:
            result = self._client.infer(
                model,
                [tensor],
                outputs=[grpc.InferRequestedOutput(o) for o in outputs],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            raise self._error(exc) from None
        return {o: result.as_numpy(o).reshape(-1)[0] for o in outputs}

    def _stream(
        self,
        model: str,
        request_json: str,
        outputs: tuple[str, ...],
        on_progress: Callable[[dict[str, Any]], None],
    ) -> dict[str, bytes]:
        """One request over a gRPC stream: progress responses, then the final one with the outputs."""
        grpc = self._grpc
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        tensor = grpc.InferInput("request", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([request_json.encode()], dtype=np.object_))
        requested = [grpc.InferRequestedOutput(o) for o in (*outputs, "progress")]
        deadline = time.monotonic() + self.timeout_s
        try:
            self._client.start_stream(callback=lambda result, error: answers.put((result, error)))
            self._client.async_stream_infer(model, [tensor], outputs=requested)
            while True:
                try:
                    result, error = answers.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise DeadlineExceededError(
                        f"no answer from {self.url} within {self.timeout_s:g}s"
                    ) from None
                if error is not None:
                    raise self._stream_error(error)
                progress = result.as_numpy("progress")
                if progress is not None:
                    on_progress(json.loads(progress.reshape(-1)[0]))
                    continue
                return {o: result.as_numpy(o).reshape(-1)[0] for o in outputs}
        except Exception as exc:
            if isinstance(exc, BirdgenError):
                raise
            raise self._error(exc) from None
        finally:
            self._client.stop_stream()

    def _stream_error(self, exc: Exception) -> BirdgenError:
        """A gRPC stream carries an error's message but not its status code; birdgen's request
        errors are recognised by the form schema.RequestError gives every message."""
        message = getattr(exc, "message", lambda: str(exc))() or str(exc)
        if not getattr(exc, "status", lambda: None)() and message.startswith(("invalid '", "missing '")):
            return InvalidRequestError(message)
        return self._error(exc)

    def _error(self, exc: Exception) -> BirdgenError:
        status = str(getattr(exc, "status", lambda: "")() or "")
        message = getattr(exc, "message", lambda: str(exc))() or str(exc)
        if "INVALID_ARGUMENT" in status:
            return InvalidRequestError(message)
        if "UNAVAILABLE" in status:
            return ServerUnavailableError(self.url, message)
        if "DEADLINE_EXCEEDED" in status or "Deadline" in message:
            return DeadlineExceededError(f"no answer from {self.url} within {self.timeout_s:g}s")
        return GenerationError(f"{status or 'error'}: {message}")

    # -- model control (the server runs with explicit model control) ----------------------------------
    def list_models(self) -> list[dict[str, str]]:
        """Every model in the repository with its version, state (READY, UNAVAILABLE, ...) and reason."""
        try:
            index = self._client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s)
        except Exception as exc:
            raise self._error(exc) from None
        return [
            {k: str(m.get(k, "")) for k in ("name", "version", "state", "reason")}
            for m in index.get("models", [])
        ]

    def load_model(self, name: str) -> None:
        """Load `name`, or reload it onto its newest version (the old one answers until the new is ready)."""
        self._control(self._client.load_model, name)

    def roll_out(self, family_model: str) -> list[str]:
        """Serve a family's newest UNets (`unet_<family>`, and `motion_unet_<family>` when exported),
        then the entries' newest versions (fresh response caches); no downtime. Returns the models
        loaded, in order."""
        family = family_of(family_model)
        if family is None:
            raise InvalidRequestError(f"'{family_model}' is not a family UNet (unet_<family>)")
        present = {m["name"] for m in self.list_models()}
        order = [family_model_name(family), family_model_name(family, MOTION_UNET)]
        loaded = [m for m in (*order, IMAGE_MODEL, ANIMATION_MODEL, ANIMATION_STREAM_MODEL) if m in present]
        for name in loaded:
            self.load_model(name)
        return loaded

    def unload_model(self, name: str) -> None:
        self._control(self._client.unload_model, name)

    def _control(self, action: Any, name: str) -> None:
        try:
            action(name, client_timeout=self.timeout_s)
        except Exception as exc:
            raise self._error(exc) from None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> BirdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
