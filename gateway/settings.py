"""The gateway's settings: one model, read from BIRDGEN_* environment variables (compose, Kubernetes).

Secrets (the API keys) come only from the environment, never from a file in the repository.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from birdgen.schema import LIMITS

ENV_PREFIX = "BIRDGEN_"


class GatewaySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    triton_url: str = "localhost:8001"  # Triton's gRPC endpoint
    redis_url: str = "redis://localhost:6379/0"  # rate limits, batch jobs and the response cache
    rate_limit_per_minute: int = Field(60, ge=1)  # per API key, or per client IP without one
    # Browsers' origins allowed to call the API (CORS); empty: same origin only (the web page at /).
    cors_origins: tuple[str, ...] = ()
    # When set, a request carrying X-API-Key must carry one of these (401 otherwise); requests
    # without a key are limited by client IP. Empty: any key is an identity for the rate limit only.
    api_keys: frozenset[str] = frozenset()
    # Request bodies above this get 413; batches above this many items 422. Both default to
    # limits.yaml's (schema.LIMITS: max_body_bytes is derived from batch.max_items and the request's
    # text limits, within serving.max_request_bytes); a deployment may lower them, never raise them.
    max_body_bytes: int = Field(LIMITS.max_body_bytes, ge=1024, le=LIMITS.max_body_bytes)
    # The bound of POST /api/v1/generate/image alone, whose body may carry a base64 control image per
    # ControlNet kind (LIMITS.max_controlled_request_bytes, 22.4 MB); batches carry templates only
    # and keep max_body_bytes. A deployment may lower it (to max_body_bytes: no room for images).
    max_image_body_bytes: int = Field(
        LIMITS.max_controlled_request_bytes, ge=1024, le=LIMITS.max_controlled_request_bytes
    )
    # The bound of POST /api/v1/generate/gif alone, whose body may carry an svd animation's picture,
    # base64 (LIMITS.max_svd_request_bytes, 11.2 MB); an AnimateDiff request, or an svd one whose
    # still the server draws, fits max_body_bytes. A deployment may lower it, never raise it.
    max_animation_body_bytes: int = Field(
        LIMITS.max_svd_request_bytes, ge=1024, le=LIMITS.max_svd_request_bytes
    )
    max_batch_items: int = Field(LIMITS.batch.max_items, ge=1, le=LIMITS.batch.max_items)
    deadline_s: float = Field(120.0, gt=0)  # one generation, end to end (the client's deadline)
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60)  # how long a batch job and its results are kept
    # A replica holds a job while it works on it; a dead replica's job is taken over this long after.
    job_lease_s: float = Field(30.0, ge=1.0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> GatewaySettings:
        """Settings from BIRDGEN_<FIELD> variables (lists comma-separated), then `overrides`."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, field in cls.model_fields.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None:
                continue
            if field.annotation in (tuple[str, ...], frozenset[str]):
                values[name] = [item.strip() for item in raw.split(",") if item.strip()]
            else:
                values[name] = raw
        values |= {k: v for k, v in overrides.items() if v is not None}
        return cls.model_validate(values)
