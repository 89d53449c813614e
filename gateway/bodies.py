"""HTTP request bodies -> the schema's requests: the original REST API's names, nothing else new.

The schema (birdgen/schema.py) stays the one definition of a request: a body is its fields, plus
the original API's spellings, translated here before the schema validates everything:
- `common_name` for `species`;
- `resolution`: a name from RESOLUTIONS or a square size in pixels, for `width` and `height`.
A batch item may not carry a control image (batch_image_request), only a template.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from birdgen.request_error import RequestError
from birdgen.schema import AnimationRequest, ImageRequest, parse_animation_request, parse_image_request

# Named square sizes of the original API (an animation's limits are smaller: its schema says which).
RESOLUTIONS = {"small": 256, "medium": 512, "large": 1024}
ALIASES = {
    "common_name": {"type": "string", "description": "the species' common name (same as `species`)"},
    "resolution": {
        "anyOf": [{"type": "string", "enum": list(RESOLUTIONS)}, {"type": "integer"}],
        "description": f"a square size: {', '.join(f'{k} = {v}' for k, v in RESOLUTIONS.items())} "
        "or pixels (same as width = height)",
    },
}


def _fields(body: Any) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise RequestError("request", body, "a JSON object of request fields")
    fields = dict(body)
    if "common_name" in fields:
        name = fields.pop("common_name")
        if fields.setdefault("species", name) != name:
            raise RequestError("common_name", name, "the same name as `species`, or only one of the two")
    if "resolution" in fields:
        value = fields.pop("resolution")
        size = RESOLUTIONS.get(value) if isinstance(value, str) else value
        if not isinstance(size, int) or isinstance(size, bool):
            raise RequestError("resolution", value, f"{', '.join(RESOLUTIONS)} or a size in pixels")
        for side in ("width", "height"):
            if fields.setdefault(side, size) != size:
                raise RequestError("resolution", value, f"no `{side}` beside it, or the same size")
    return fields


def image_request(body: Any, **defaults: Any) -> ImageRequest:
    return parse_image_request(defaults | _fields(body))


def batch_image_request(body: Any) -> ImageRequest:
    """One item of a batch: an image request whose ControlNets, if any, use templates. A batch body
    has the small bound (GatewaySettings.max_body_bytes), so an uploaded control image is refused,
    naming control.<kind>.image; a single request (POST /api/v1/generate/image) may carry one."""
    request = image_request(body)
    for setting in request.control_settings():
        if setting.image is not None:
            raise RequestError(
                setting.image_field,
                f"an image of {setting.image_bytes} bytes",
                "null in a batch item: a template (a pose) instead, or the image in a single "
                "POST /api/v1/generate/image",
            )
    return request


def animation_request(body: Any, **defaults: Any) -> AnimationRequest:
    return parse_animation_request(defaults | _fields(body))


def body_schema(request_type: type[ImageRequest | AnimationRequest]) -> dict[str, Any]:
    """The OpenAPI request body: the schema's own JSON schema plus the aliases above."""
    schema = request_type.model_json_schema()
    schema["properties"] = {**schema["properties"], **ALIASES}
    schema.pop("required", None)  # `species` or `common_name`
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
