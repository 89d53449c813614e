"""Per-client rate limit shared by every gateway replica: a sliding one-minute window in Redis.

A sorted set per client holds the times of its requests in the last window; one Lua script trims,
counts and adds atomically, so replicas never race. A refused request gets the seconds until the
oldest request in the window leaves it (Retry-After). A Redis outage lets requests through (counted
and logged): the limit protects the GPUs, it must not take the service down with Redis.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass

import redis.asyncio

log = logging.getLogger(__name__)

KEY_PREFIX = "birdgen:ratelimit:v1:"
WINDOW_S = 60.0
# KEYS[1] the client's set; ARGV: now (ms), window (ms), limit, a unique member.
# Returns 0 when allowed, else the milliseconds until a slot frees.
_SLIDING_WINDOW = """
redis.call('zremrangebyscore', KEYS[1], '-inf', ARGV[1] - ARGV[2])
if redis.call('zcard', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('zadd', KEYS[1], ARGV[1], ARGV[4])
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 0
end
local oldest = redis.call('zrange', KEYS[1], 0, 0, 'WITHSCORES')
return math.max(1, tonumber(oldest[2]) + ARGV[2] - ARGV[1])
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int = 0  # whole seconds, at least 1 when refused


class RateLimiter:
    def __init__(self, client: redis.asyncio.Redis, per_minute: int) -> None:
        self.per_minute = per_minute
        self._script = client.register_script(_SLIDING_WINDOW)

    async def check(self, identity: str) -> Decision:
        """Count one request of `identity` (an API key or a client IP) if the window has room."""
        now_ms = int(time.time() * 1000)
        args = [now_ms, int(WINDOW_S * 1000), self.per_minute, f"{now_ms}-{secrets.token_hex(4)}"]
        try:
            wait_ms = int(await self._script(keys=[KEY_PREFIX + identity], args=args))
        except (redis.RedisError, OSError) as exc:
            log.warning("rate limit not applied, Redis failed: %s", exc)
            return Decision(True)
        return Decision(True) if wait_ms == 0 else Decision(False, max(1, math.ceil(wait_ms / 1000)))
