"""birdgen's client library (no torch): `BirdClient(url).generate_image(...)`."""

from birdgen.client.client import BirdClient, GeneratedAnimation, GeneratedImage
from birdgen.client.errors import (
    BirdgenError,
    DeadlineExceededError,
    GenerationError,
    InvalidRequestError,
    ServerUnavailableError,
)

__all__ = [
    "BirdClient",
    "BirdgenError",
    "DeadlineExceededError",
    "GeneratedAnimation",
    "GeneratedImage",
    "GenerationError",
    "InvalidRequestError",
    "ServerUnavailableError",
]
