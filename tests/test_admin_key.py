"""An admin key locks Triton's model control and other admin protocols; inference stays open.

A real tritonserver with `admin_key`: ordinary clients generate images, read health and metadata,
but cannot list, load or unload models (gRPC or HTTP) without the key; with it they can. The gateway,
which holds no admin key, still reports health and model versions.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from birdgen.client import AdminKeyRequiredError, BirdClient
from birdgen.contracts import ADMIN_KEY_GRPC, ADMIN_KEY_HEADER
from birdgen.server import TritonServer
from tests.conftest import IMAGE_MODELS, ROBIN
from tests.gateway_process import running_gateway
from tests.redis_fixture import running_redis

pytestmark = pytest.mark.triton
KEY = secrets.token_hex(16)


@pytest.fixture(scope="module")
def locked(repository: Path) -> Iterator[TritonServer]:
    with TritonServer(
        repository, model_control="explicit", load_models=IMAGE_MODELS, admin_key=KEY
    ) as server:
        yield server


def test_inference_is_open_admin_calls_need_the_key(locked: TritonServer) -> None:
    with BirdClient(locked.grpc_url) as anyone:
        assert anyone.generate_image(**ROBIN).data[:8] == b"\x89PNG\r\n\x1a\n"
        for refused in (
            anyone.list_models,
            lambda: anyone.load_model("unet"),
            lambda: anyone.unload_model("unet"),
        ):
            with pytest.raises(AdminKeyRequiredError, match=ADMIN_KEY_HEADER):
                refused()
    with (
        BirdClient(locked.grpc_url, headers={ADMIN_KEY_GRPC: "wrong"}) as guess,
        pytest.raises(AdminKeyRequiredError, match=ADMIN_KEY_HEADER),
    ):
        guess.list_models()
    with BirdClient(locked.grpc_url, headers={ADMIN_KEY_GRPC: KEY}) as admin:
        ready = {m["name"] for m in admin.list_models() if m["state"] == "READY"}
        assert set(IMAGE_MODELS) <= ready
        admin.load_model("vae_decoder")  # a reload: the key opens model control
        assert admin.generate_image(**{**ROBIN, "seed": 2}).data[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_http_endpoint_is_locked_the_same_way(locked: TritonServer) -> None:
    url = f"http://{locked.http_url}"
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/bird_image").status_code == 200  # metadata stays open
    assert httpx.post(f"{url}/v2/repository/index").status_code >= 400
    assert httpx.post(f"{url}/v2/repository/models/unet/unload").status_code >= 400
    opened = httpx.post(f"{url}/v2/repository/index", headers={ADMIN_KEY_HEADER: KEY})
    assert opened.status_code == 200 and {"name": "unet", "version": "1", "state": "READY"} in opened.json()


def test_the_gateway_needs_no_admin_key(locked: TritonServer, tmp_path: Path) -> None:
    with (
        running_redis(tmp_path) as redis_server,
        running_gateway(locked.grpc_url, redis_server.url, tmp_path) as gw,
    ):
        health = httpx.get(gw.url + "/health").json()
    assert health["status"] == "ok" and health["triton"]["models"] == {"bird_image": "1"}
