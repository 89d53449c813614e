"""`AsyncBirdClient`: `BirdClient`'s methods as coroutines, over tritonclient's gRPC aio client.

For asyncio services (the HTTP gateway): concurrent requests share one channel and no thread waits.
Requests, results, retries and errors are calls.py's, exactly as for the sync client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import cached_property
from typing import Any, TypeVar

import grpc
import tritonclient.grpc.aio as grpcaio
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


class AsyncBirdClient(ClientBase):
    """Asyncio client; one gRPC channel, opened on the first call inside the event loop that uses it.

    Use it from one event loop (`async with AsyncBirdClient(url) as client: ...`). Options: ClientBase.
    """

    @cached_property
    def _client(self) -> grpcaio.InferenceServerClient:
        return grpcaio.InferenceServerClient(**self._connection())

    async def generate_image(
        self,
        request: ImageRequest | Mapping[str, Any] | None = None,
        *,
        deadline_s: float | None = None,
        **fields: Any,
    ) -> GeneratedImage:
        """Generate one image, as BirdClient.generate_image does (format="eink": a GeneratedEink).

        Control images are decoded for the local check in a worker thread, off the event loop."""
        call = image_call(request, fields, check_images=False)
        if call.has_images():
            await asyncio.to_thread(call.check_images)
        attempts = self._attempts(deadline_s)
        return as_image(await self._cached(call, attempts, lambda: self._generate(call, attempts)))

    async def generate_animation(
        self,
        request: AnimationRequest | Mapping[str, Any] | None = None,
        *,
        on_progress: OnProgress | None = None,
        deadline_s: float | None = None,
        **fields: Any,
    ) -> GeneratedAnimation:
        """Generate one clip; with `on_progress`, streamed as by BirdClient.generate_animation.

        An svd request's `image` is decoded for the local check in a worker thread, off the event loop."""
        call = animation_call(request, fields, stream=on_progress is not None, check_images=False)
        if call.has_images():
            await asyncio.to_thread(call.check_images)
        attempts = self._attempts(deadline_s)
        entry = await self._cached(call, attempts, lambda: self._generate(call, attempts, on_progress))
        return as_animation(entry)

    async def _cached(
        self, call: Call, attempts: Attempts, generate: Callable[[], Awaitable[CacheEntry]]
    ) -> CacheEntry:
        if self.cache is None:
            return await generate()
        version = await self._model_version(call.cache_model, attempts)
        return await self.cache.aget_or_generate(
            call.request,
            generate,
            model_version=version,
            wait_s=attempts.remaining(),
            derive=call.derivation(),
        )

    async def _model_version(self, model: str, attempts: Attempts) -> str:
        known = self._versions.get(model)
        if known is not None:
            return known
        metadata = await self._rpc(attempts, "get_model_metadata", model, as_json=True)
        return self._versions.put(model, metadata)

    async def _rpc(self, attempts: Attempts, method: str, *args: Any, **kwargs: Any) -> Any:
        """tritonclient's `method` with this client's headers, under the call's deadline and retries."""
        rpc = getattr(self._client, method)
        return await self._retrying(
            attempts, lambda timeout: rpc(*args, headers=self.headers, client_timeout=timeout, **kwargs)
        )

    async def _retrying(self, attempts: Attempts, attempt: Callable[[float], Awaitable[T]]) -> T:
        """`await attempt(timeout)` until it succeeds or `attempts` says stop (then its typed error)."""
        while True:
            try:
                return await attempt(attempts.timeout())
            except InferenceServerException as exc:
                await asyncio.sleep(attempts.pause_after(exc))

    async def _generate(
        self,
        call: Call,
        attempts: Attempts,
        on_progress: OnProgress | None = None,
    ) -> CacheEntry:
        if on_progress is None:
            result = await self._rpc(attempts, "infer", call.model, call.inputs(), outputs=call.requested())
            return call.entry(result)
        return await self._retrying(attempts, lambda timeout: self._stream_once(call, timeout, on_progress))

    async def _stream_once(self, call: Call, timeout: float, on_progress: OnProgress) -> CacheEntry:
        """One request over a gRPC stream: progress responses, then the final one with the outputs."""

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": call.model, "inputs": call.inputs(), "outputs": call.requested()}

        responses = self._client.stream_infer(requests(), stream_timeout=timeout, headers=self.headers)
        try:
            async for result, error in responses:
                entry = call.answer(result, error, on_progress)
                if entry is not None:
                    return entry
        except grpc.RpcError as exc:  # tritonclient's aio stream lets transport errors through as is
            raise InferenceServerException(msg=exc.details(), status=str(exc.code())) from None
        finally:
            responses.cancel()
        raise InferenceServerException(msg=f"{call.model} closed the stream without a result")

    async def served_versions(self, name: str, *, deadline_s: float | None = None) -> list[str]:
        """The versions of `name` that answer now; [] when it is not loaded. Health and metadata
        protocols only, so it works for every client of a server whose admin protocols are locked."""
        attempts = self._attempts(deadline_s)
        if not await self._rpc(attempts, "is_model_ready", name):
            return []
        metadata = await self._rpc(attempts, "get_model_metadata", name, as_json=True)
        return list(metadata.get("versions", []))

    # -- model control (the server runs with explicit model control) ----------------------------------
    async def list_models(self, *, deadline_s: float | None = None) -> list[dict[str, str]]:
        """Every model in the repository with its version, state and reason (as BirdClient's)."""
        index = await self._rpc(self._attempts(deadline_s), "get_model_repository_index", as_json=True)
        return models_of(index)

    async def load_model(self, name: str, *, deadline_s: float | None = None) -> None:
        """Load `name`, or reload it onto its newest version (the old one answers until the new is ready)."""
        await self._rpc(self._attempts(deadline_s), "load_model", name)
        self._versions.forget()

    async def roll_out(self, family_model: str, *, deadline_s: float | None = None) -> list[str]:
        """Serve a family's newest UNets, then the entries' newest versions (fresh response caches);
        no downtime. Returns the models loaded, in order (see calls.roll_out_order)."""
        loaded = roll_out_order(family_model, await self.list_models(deadline_s=deadline_s))
        for name in loaded:
            await self.load_model(name, deadline_s=deadline_s)
        return loaded

    async def unload_model(self, name: str, *, deadline_s: float | None = None) -> None:
        await self._rpc(self._attempts(deadline_s), "unload_model", name)
        self._versions.forget()

    async def close(self) -> None:
        client = self.__dict__.pop("_client", None)  # only if a call opened it
        if client is not None:
            await client.close()

    async def __aenter__(self) -> AsyncBirdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
