"""`BirdClient`: the platform backend's way to ask birdgen for a bird, over Triton gRPC.

Thin on purpose: no torch. The request is validated with the same schema the server uses before
anything is sent, so a bad request fails fast with the same message the server would give. What a
call means (requests, results, retries, errors) lives in calls.py, shared with `AsyncBirdClient`.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any, TypeVar

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from birdgen.client.cache import CacheEntry
from birdgen.client.calls import (
    Attempts,
    Call,
    ClientBase,
    GeneratedAnimation,
    GeneratedImage,
    OnProgress,
    animation_call,
    as_animation,
    as_image,
    image_call,
    models_of,
    roll_out_order,
)
from birdgen.schema import AnimationRequest, ImageRequest

T = TypeVar("T")


class BirdClient(ClientBase):
    """Synchronous client; one gRPC channel, opened on the first call, reused. Options: ClientBase."""

    @cached_property
    def _client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(**self._connection())

    def generate_image(
        self,
        request: ImageRequest | Mapping[str, Any] | None = None,
        *,
        deadline_s: float | None = None,
        **fields: Any,
    ) -> GeneratedImage:
        """Generate one image. Pass an ImageRequest, a mapping, or the fields as keywords.

        With format="eink" (and eink_panel, ...) the result is a GeneratedEink: the PNG preview and
        the panel's buffer. With a cache, it is rendered here from the cached PNG of the same request
        when there is one, without a server call.

        `control={"openpose": {"image": Path("pose.png"), "scale": 0.8}, "depth": {"template":
        "perched"}}` guides the picture with ControlNets (docs/client.md); an image may be a Path,
        bytes or base64 text, and is decoded here first, so a bad picture fails before sending.
        """
        call = image_call(request, fields)
        attempts = self._attempts(deadline_s)
        return as_image(self._cached(call, attempts, lambda: self._generate(call, attempts)))

    def generate_animation(
        self,
        request: AnimationRequest | Mapping[str, Any] | None = None,
        *,
        on_progress: OnProgress | None = None,
        deadline_s: float | None = None,
        **fields: Any,
    ) -> GeneratedAnimation:
        """Generate one clip (behaviour, duration_seconds, fps, format webp|gif|both, ...).

        `engine="svd"` animates one still with Stable Video Diffusion (docs/svd.md): `image` (a Path,
        bytes or base64 text of a PNG or JPEG, decoded here first, so a bad picture fails before
        sending), or without one the still the server draws from the request (`pose`, ...); SVD's
        settings are `motion_bucket_id`, `noise_aug_strength`, `min_guidance_scale`,
        `max_guidance_scale` and `decode_chunk_size`.

        With `on_progress`, the call streams from `bird_animation_stream` and hands each progress
        message ({"stage": "denoise" | "decode", "done", "total"}) to it before returning the clip
        (none on a cache hit; after a retry, progress starts again).
        """
        call = animation_call(request, fields, stream=on_progress is not None)
        attempts = self._attempts(deadline_s)
        return as_animation(self._cached(call, attempts, lambda: self._generate(call, attempts, on_progress)))

    def _cached(self, call: Call, attempts: Attempts, generate: Callable[[], CacheEntry]) -> CacheEntry:
        if self.cache is None:
            return generate()
        version = self._model_version(call.cache_model, attempts)
        return self.cache.get_or_generate(
            call.request,
            generate,
            model_version=version,
            wait_s=attempts.remaining(),
            derive=call.derivation(),
        )

    def _model_version(self, model: str, attempts: Attempts) -> str:
        known = self._versions.get(model)
        if known is not None:
            return known
        return self._versions.put(model, self._rpc(attempts, "get_model_metadata", model, as_json=True))

    def _rpc(self, attempts: Attempts, method: str, *args: Any, **kwargs: Any) -> Any:
        """tritonclient's `method` with this client's headers, under the call's deadline and retries."""
        rpc = getattr(self._client, method)
        return self._retrying(
            attempts, lambda timeout: rpc(*args, headers=self.headers, client_timeout=timeout, **kwargs)
        )

    def _retrying(self, attempts: Attempts, attempt: Callable[[float], T]) -> T:
        """`attempt(timeout)` until it succeeds or `attempts` says stop (then its typed error)."""
        while True:
            try:
                return attempt(attempts.timeout())
            except InferenceServerException as exc:
                time.sleep(attempts.pause_after(exc))

    def _generate(
        self,
        call: Call,
        attempts: Attempts,
        on_progress: OnProgress | None = None,
    ) -> CacheEntry:
        if on_progress is None:
            return call.entry(
                self._rpc(attempts, "infer", call.model, call.inputs(), outputs=call.requested())
            )
        return self._retrying(attempts, lambda timeout: self._stream_once(call, timeout, on_progress))

    def _stream_once(self, call: Call, timeout: float, on_progress: OnProgress) -> CacheEntry:
        """One request over a gRPC stream: progress responses, then the final one with the outputs."""
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        deadline = time.monotonic() + timeout
        self._client.start_stream(lambda result, error: answers.put((result, error)), headers=self.headers)
        try:
            self._client.async_stream_infer(call.model, call.inputs(), outputs=call.requested())
            while True:
                try:
                    result, error = answers.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    # As a unary call's timeout: the retry loop turns it into the call's error.
                    raise InferenceServerException(
                        "stream timed out", "StatusCode.DEADLINE_EXCEEDED"
                    ) from None
                entry = call.answer(result, error, on_progress)
                if entry is not None:
                    return entry
        finally:
            self._client.stop_stream(cancel_requests=True)

    # -- model control (the server runs with explicit model control) ----------------------------------
    def list_models(self, *, deadline_s: float | None = None) -> list[dict[str, str]]:
        """Every model in the repository with its version, state (READY, UNAVAILABLE, ...) and reason."""
        return models_of(self._rpc(self._attempts(deadline_s), "get_model_repository_index", as_json=True))

    def load_model(self, name: str, *, deadline_s: float | None = None) -> None:
        """Load `name`, or reload it onto its newest version (the old one answers until the new is ready)."""
        self._rpc(self._attempts(deadline_s), "load_model", name)
        self._versions.forget()

    def roll_out(self, family_model: str, *, deadline_s: float | None = None) -> list[str]:
        """Serve a family's newest UNets, then the entries' newest versions (fresh response caches);
        no downtime. Returns the models loaded, in order (see calls.roll_out_order)."""
        loaded = roll_out_order(family_model, self.list_models(deadline_s=deadline_s))
        for name in loaded:
            self.load_model(name, deadline_s=deadline_s)
        return loaded

    def unload_model(self, name: str, *, deadline_s: float | None = None) -> None:
        self._rpc(self._attempts(deadline_s), "unload_model", name)
        self._versions.forget()

    def close(self) -> None:
        client = self.__dict__.pop("_client", None)  # only if a call opened it
        if client is not None:
            client.close()

    def __enter__(self) -> BirdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
