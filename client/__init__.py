"""birdgen's client library (no torch): `BirdClient(url).generate_image(...)`, its asyncio twin
`AsyncBirdClient`, and the Redis `ResponseCache` either can use (docs/client.md)."""

from birdgen.client.aio import AsyncBirdClient
from birdgen.client.cache import CacheEntry, ResponseCache, cache_key
from birdgen.client.calls import GeneratedAnimation, GeneratedEink, GeneratedImage, RetryPolicy
from birdgen.client.client import BirdClient
from birdgen.client.errors import (
    AdminKeyRequiredError,
    BirdgenError,
    DeadlineExceededError,
    GenerationError,
    InvalidRequestError,
    ServerOverloadedError,
    ServerUnavailableError,
)

__all__ = [
    "AdminKeyRequiredError",
    "AsyncBirdClient",
    "BirdClient",
    "BirdgenError",
    "CacheEntry",
    "DeadlineExceededError",
    "GeneratedAnimation",
    "GeneratedEink",
    "GeneratedImage",
    "GenerationError",
    "InvalidRequestError",
    "ResponseCache",
    "RetryPolicy",
    "ServerOverloadedError",
    "ServerUnavailableError",
    "cache_key",
]
