"""Batch jobs: many image requests under one job id, kept in Redis so no gateway restart loses one.

Layout (prefix `birdgen:job:v1:`): `<id>` a hash (status, total, done, failed, created), `<id>:items`
the canonical request JSON of each item, `<id>:results` a hash index -> outcome JSON, `<id>:file:<i>`
the image bytes, and the set `pending` of unfinished job ids. An item's outcome is written once
(HSETNX), so a repeat never double-counts. A replica works on a job while it holds the job's lease
(SET NX PX, renewed after each item); a killed replica's lease runs out and any replica's periodic
scan of `pending` takes the job over, skipping the items already done. An item the server could not
be reached for stays pending and is tried again by the next scan; only a refused request or a failed
generation is a final "failed" outcome. Requests carry a seed (or
derive one), so an item generated twice gives the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio

from birdgen.client import BirdgenError, DeadlineExceededError, GeneratedImage, ServerUnavailableError
from birdgen.schema import ImageRequest

log = logging.getLogger(__name__)

PREFIX = "birdgen:job:v1:"
PENDING = PREFIX + "pending"
JOB_ID_BYTES = 16
# Items of one job generated at once: enough to fill the UNet's batches, few enough to leave room
# for interactive requests of other clients.
ITEM_CONCURRENCY = 4

Generate = Callable[[ImageRequest], Awaitable[GeneratedImage]]
ErrorStatus = Callable[[BirdgenError], int]


def _key(job_id: str, *parts: object) -> str:
    return PREFIX + ":".join([job_id, *map(str, parts)])


def valid_job_id(job_id: str) -> bool:
    return len(job_id) == 2 * JOB_ID_BYTES and all(c in "0123456789abcdef" for c in job_id)


class BatchJobs:
    """Submit, run, resume and report batch jobs. `generate` makes one image (the gateway's client)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        generate: Generate,
        error_status: ErrorStatus,
        *,
        ttl_s: int,
        lease_s: float = 30.0,
        on_item: Callable[[str], None] = lambda outcome: None,
    ) -> None:
        self.redis = client
        self.generate = generate
        self.error_status = error_status
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self.on_item = on_item
        self.running: dict[str, asyncio.Task[None]] = {}

    async def submit(self, requests: Sequence[ImageRequest]) -> str:
        job_id = secrets.token_hex(JOB_ID_BYTES)
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                _key(job_id),
                mapping={"status": "queued", "total": len(requests), "done": 0, "failed": 0, "created": now},
            )
            pipe.rpush(_key(job_id, "items"), *(r.canonical_json() for r in requests))
            pipe.sadd(PENDING, job_id)
            await pipe.execute()
        self.start(job_id)
        return job_id

    def start(self, job_id: str) -> None:
        if job_id not in self.running:
            task = asyncio.create_task(self._work(job_id), name=f"batch-{job_id}")
            self.running[job_id] = task
            task.add_done_callback(lambda _: self.running.pop(job_id, None))

    async def resume_pending(self) -> None:
        """Start every unfinished job whose lease is free (a replica that died held it)."""
        for raw in await self.redis.smembers(PENDING):
            job_id = raw.decode()
            if job_id not in self.running and not await self.redis.exists(_key(job_id, "lease")):
                self.start(job_id)

    async def scan_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.resume_pending()
            except (redis.RedisError, OSError) as exc:
                log.warning("batch job scan failed, retrying: %s", exc)
            await asyncio.sleep(interval_s)

    async def _work(self, job_id: str) -> None:
        token = secrets.token_hex(8)
        lease = _key(job_id, "lease")
        if not await self.redis.set(lease, token, nx=True, px=int(self.lease_s * 1000)):
            return  # another replica works on it
        try:
            await self.redis.hset(_key(job_id), "status", "running")
            items = [json.loads(raw) for raw in await self.redis.lrange(_key(job_id, "items"), 0, -1)]
            finished = {int(i) for i in await self.redis.hkeys(_key(job_id, "results"))}
            gate = asyncio.Semaphore(ITEM_CONCURRENCY)

            async def one(index: int, fields: dict[str, Any]) -> None:
                async with gate:
                    await self._run_item(job_id, index, ImageRequest(**fields))
                    await self.redis.set(lease, token, xx=True, px=int(self.lease_s * 1000))

            await asyncio.gather(*(one(i, f) for i, f in enumerate(items) if i not in finished))
            if await self.redis.hlen(_key(job_id, "results")) == len(items):
                await self._finish(job_id)
        except (redis.RedisError, OSError) as exc:
            log.warning("batch job %s paused, Redis failed (the scan resumes it): %s", job_id, exc)
        except Exception:  # a bug must not end the scan's task; the job is retried by the next scan
            log.exception("batch job %s stopped by an unexpected error (the scan retries it)", job_id)
        finally:
            with contextlib.suppress(redis.RedisError, OSError):
                if await self.redis.get(lease) == token.encode():
                    await self.redis.delete(lease)

    async def _run_item(self, job_id: str, index: int, request: ImageRequest) -> None:
        """Generate one item and record its outcome; an outage (Triton unreachable, the deadline) is
        no outcome: the item stays pending and the next scan tries it again."""
        try:
            image = await self.generate(request)
        except (ServerUnavailableError, DeadlineExceededError) as exc:
            log.warning("batch job %s item %d waits for the server: %s", job_id, index, exc)
            return
        except BirdgenError as exc:
            error = {"type": type(exc).__name__, "status": self.error_status(exc), "message": str(exc)}
            outcome = {"status": "failed", "error": error}
        else:
            await self.redis.set(_key(job_id, "file", index), image.data, ex=self.ttl_s)
            outcome = {"status": "done", "format": image.format, "metadata": image.metadata}
        if await self.redis.hsetnx(_key(job_id, "results"), str(index), json.dumps(outcome)):
            await self.redis.hincrby(_key(job_id), outcome["status"], 1)
            self.on_item(outcome["status"])

    async def _finish(self, job_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(_key(job_id), mapping={"status": "done", "finished": time.time()})
            for key in (_key(job_id), _key(job_id, "items"), _key(job_id, "results")):
                pipe.expire(key, self.ttl_s)
            pipe.srem(PENDING, job_id)
            await pipe.execute()

    async def status(self, job_id: str) -> dict[str, Any] | None:
        """The job's state and each item's outcome; None for an unknown (or expired) job."""
        job = {k.decode(): v.decode() for k, v in (await self.redis.hgetall(_key(job_id))).items()}
        if not job:
            return None
        results = {
            int(k): json.loads(v) for k, v in (await self.redis.hgetall(_key(job_id, "results"))).items()
        }
        total, done, failed = int(job["total"]), int(job["done"]), int(job["failed"])
        return {
            "job_id": job_id,
            "status": job["status"],
            "total": total,
            "done": done,
            "failed": failed,
            "progress": (done + failed) / total,
            "items": [{"index": i, **results.get(i, {"status": "pending"})} for i in range(total)],
        }

    async def file(self, job_id: str, index: int) -> tuple[bytes, str] | None:
        """An item's image and format; None while it has none."""
        raw = await self.redis.hget(_key(job_id, "results"), str(index))
        data = await self.redis.get(_key(job_id, "file", index))
        if raw is None or data is None:
            return None
        return data, json.loads(raw)["format"]

    async def close(self) -> None:
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
