"""The `birdgen` command: tiny-model, export, keygen, serve, entrypoint, generate, demo, pregenerate, qa.

Errors a user can fix (bad request, missing model part, server down) print one line and exit 2;
no traceback. Heavy imports happen inside the subcommand that needs them, so `birdgen generate`
stays as light as the client library.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from birdgen.contracts import ANIMATION_MODEL, CONTROLNET_KINDS, MANIFEST, MANIFEST_SIGNATURE
from birdgen.schema import LIMITS, VOCABULARY, AnimationRequest, ImageRequest

DEFAULT_REPO = Path("outputs/model_repository")
# `birdgen generate image --control-<word> FILE | --<word>-template POSE`: the ControlNet kind of each word.
CONTROL_FLAGS = {"pose": "openpose", "depth": "depth"}
CONTROL_SETTINGS = ("scale", "start", "end")
CONTROL_HELP = {
    "scale": "conditioning scale, 0..2 (0: no effect)",
    "start": "fraction of the steps where this ControlNet starts, 0..1",
    "end": "fraction of the steps where it stops, above the start, 0..1",
}
# What `birdgen demo` asks for (the tests start from the image request too).
DEMO_REQUEST = {
    "species": "American Robin",
    "scientific_name": "Turdus migratorius",
    "species_id": "amerob",
    "pose": "perched",
    "season": "spring",
    "lighting": "golden-hour",
    "seed": 42,
    "steps": 1,
    "width": 512,
    "height": 512,
    "format": "png",
}
DEMO_ANIMATION = {
    **{k: v for k, v in DEMO_REQUEST.items() if k not in ("pose", "steps", "format")},
    "behaviour": "singing",
    "format": "both",
}


def _tiny_model(args: argparse.Namespace) -> int:
    from birdgen.tiny_model import write_tiny_model

    out = write_tiny_model(args.out, seed=args.seed, preset=args.preset)
    print(f"random-weight SDXL-Turbo model ({args.preset} preset) written to {out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from birdgen.export.exporter import export_repository
    from birdgen.signing import signing_key_from_env

    manifest = export_repository(
        args.model_dir,
        args.out,
        engine=args.engine,
        device=args.device,
        loras=dict(_key_path("--lora", value) for value in args.lora),
        motion_adapter=args.motion_adapter,
        max_frames=args.max_frames,
        controlnets=dict(_key_path("--controlnet", value) for value in args.controlnet),
        svd=args.svd,
        entry_instances=args.entry_instances,
        force=args.force,
        signing_key=args.signing_key or signing_key_from_env(),
        jobs=args.jobs,
    )
    print(
        f"model repository {args.out} ready: model_version {manifest['model_version']}, "
        f"engine {manifest['engine']}, {len(manifest['files'])} files in manifest.json"
    )
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from birdgen.signing import PUBLIC_KEY_ENV, SIGNING_KEY_ENV, generate_keys

    private, public = generate_keys(args.out)
    print(
        f"wrote {private} (private, mode 0600: keep it where exports are made; {SIGNING_KEY_ENV} or "
        f"birdgen export --signing-key) and {public} (public: give it to the servers as {PUBLIC_KEY_ENV})"
    )
    return 0


def _key_path(option: str, value: str) -> tuple[str, Path]:
    """`--lora FAMILY=PATH`, `--controlnet KIND=PATH`."""
    key, sep, path = value.partition("=")
    if not sep or not key or not path:
        raise ValueError(f"{option} takes NAME=PATH, got {value!r}")
    return key, Path(path)


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return number


def _server(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Explicit model control: the core models load at start, family UNets on first use or on request."""
    from birdgen.manifest import core_models
    from birdgen.server import TritonServer, admin_key_from_env

    return TritonServer(
        args.model_repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        model_control="explicit",
        load_models=core_models(args.model_repository),
        admin_key=admin_key_from_env(),
    )


def _serve(args: argparse.Namespace) -> int:
    from birdgen.server import serve_forever

    return serve_forever(_server(args))


def _models(args: argparse.Namespace) -> int:
    from birdgen.client import BirdClient
    from birdgen.contracts import ADMIN_KEY_GRPC, family_of
    from birdgen.server import admin_key_from_env

    if args.action != "list" and not args.name:
        raise ValueError(f"models {args.action} needs a model name (see: birdgen models list)")
    key = admin_key_from_env()
    with BirdClient(args.url, headers={ADMIN_KEY_GRPC: key} if key else None) as client:
        shown = {args.name}
        if args.action == "load" and family_of(args.name):
            shown.update(client.roll_out(args.name))  # the family's other UNet and the entries reload too
        elif args.action == "load":
            client.load_model(args.name)
        elif args.action == "unload":
            client.unload_model(args.name)
        for model in client.list_models():
            if args.action == "list" or model["name"] in shown:
                print(
                    f"{model['name']:<28} {model['version'] or '-':>7}  {model['state']:<12} "
                    f"{model['reason']}"
                )
    return 0


def _request_fields(args: argparse.Namespace, request: type) -> dict[str, object]:
    """The request fields given as flags (a field without a flag of its own, `control`, is skipped)."""
    return {
        name: getattr(args, name) for name in request.model_fields if getattr(args, name, None) is not None
    }


def image_request_fields(args: argparse.Namespace) -> dict[str, object]:
    """`birdgen generate image`'s flags as the request's fields, `control` built from the
    --control-<word> / --<word>-template flags (ValueError for a setting without a source)."""
    fields = _request_fields(args, ImageRequest)
    control = {}
    for word, kind in CONTROL_FLAGS.items():
        file, template = getattr(args, f"control_{word}"), getattr(args, f"{word}_template")
        given = {key: getattr(args, f"control_{word}_{key}") for key in CONTROL_SETTINGS}
        settings = {key: value for key, value in given.items() if value is not None}
        if file is None and template is None:
            if settings:
                raise ValueError(
                    f"--control-{word}-{next(iter(settings))} needs --control-{word} FILE or "
                    f"--{word}-template POSE"
                )
            continue
        control[kind] = ({"image": file} if file is not None else {"template": template}) | settings
    return fields | ({"control": control} if control else {})


def _output_path(out: Path, fmt: str) -> Path:
    return out if out.suffix else out.with_suffix("." + ("jpg" if fmt == "jpeg" else fmt))


def _generate_image(args: argparse.Namespace) -> int:
    """With --format eink, the PNG preview goes to --out and the panel buffer beside it as .bin."""
    from birdgen.client import BirdClient, GeneratedEink

    with BirdClient(args.url, deadline_s=args.timeout) as client:
        image = client.generate_image(**image_request_fields(args))
    path = image.save(_output_path(args.out, image.format))
    written = [f"{path} ({len(image.data)} bytes)"]
    if isinstance(image, GeneratedEink):
        buffer = image.save_buffer(path.with_suffix(".bin"))
        size = f"{image.width}x{image.height}, {image.bits_per_pixel}-bit"
        written.append(f"{buffer} ({len(image.buffer)} bytes, {size})")
    print(json.dumps(image.metadata, indent=2, sort_keys=True))
    print(f"wrote {', '.join(written)}", file=sys.stderr)
    return 0


def animation_request_fields(args: argparse.Namespace) -> dict[str, object]:
    """`birdgen generate animation`'s flags as the request's fields: `--image FILE` is the svd
    request's `image` as a Path, which the client reads, base64-encodes and decodes before sending
    (a bad file is the one-line error naming `image`)."""
    return _request_fields(args, AnimationRequest)


def _generate_animation(args: argparse.Namespace) -> int:
    from birdgen.client import BirdClient

    with BirdClient(args.url, deadline_s=args.timeout) as client:
        clip = client.generate_animation(**animation_request_fields(args))
    written = clip.save(args.out, gif=args.gif, poster=args.poster)
    print(json.dumps(clip.metadata, indent=2, sort_keys=True))
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The main job on the embedded default: tiny model -> export -> Triton -> a labelled image and
    animation (WebP, GIF and poster) of the sample species."""
    import time

    from birdgen.client import BirdClient
    from birdgen.export.exporter import export_repository
    from birdgen.manifest import core_models
    from birdgen.model_folder import check_model_folder
    from birdgen.server import TritonServer
    from birdgen.tiny_model import write_tiny_model

    out = Path(args.out)
    model_dir = Path(args.model_dir) if args.model_dir else out / "tiny-sdxl-turbo"
    if not args.model_dir and not (model_dir / "model_index.json").is_file():
        write_tiny_model(model_dir)
        print(f"[demo] tiny model written to {model_dir}")
    check_model_folder(model_dir)
    repo = out / "model_repository"
    # Two export processes (the tiny model's stages are small); the server loads the core models,
    # the ControlNet and SVD stages load on first use as in production.
    manifest = export_repository(model_dir, repo, progress=lambda m: print(f"[demo] export: {m}"), jobs=2)
    with TritonServer(repo, model_control="explicit", load_models=core_models(repo)) as server:
        print(f"[demo] tritonserver ready at {server.grpc_url} (model {manifest['model_version']})")
        with BirdClient(server.grpc_url) as client:
            start = time.perf_counter()
            image = client.generate_image(**DEMO_REQUEST)
            seconds = time.perf_counter() - start
            clip, clip_seconds = None, 0.0
            if ANIMATION_MODEL in manifest.get("entries", []):
                start = time.perf_counter()
                clip = client.generate_animation(**DEMO_ANIMATION)
                clip_seconds = time.perf_counter() - start
    path = image.save(out / "american_robin.png")
    (out / "american_robin.json").write_text(json.dumps(image.metadata, indent=2, sort_keys=True) + "\n")
    print(
        f"[demo] wrote {path} ({image.image.width}x{image.image.height}, {len(image.data)} bytes) in "
        f"{seconds * 1000:.0f} ms through Triton; metadata in {out / 'american_robin.json'}"
    )
    print(f"[demo] prompt: {image.metadata['prompt']}")
    if clip is not None:
        files = clip.save(
            out / "american_robin.webp",
            gif=out / "american_robin.gif",
            poster=out / "american_robin_poster.png",
        )
        sizes = ", ".join(f"{p.name} {p.stat().st_size} bytes" for p in files)
        print(
            f"[demo] animation ({clip.metadata['frames']} frames at {clip.metadata['fps']} fps, "
            f"{clip.metadata['behaviour']}) in {clip_seconds:.1f} s: {sizes}"
        )
    return 0


def _gateway(args: argparse.Namespace) -> int:
    """Serve the gateway with uvicorn until SIGINT/SIGTERM (uvicorn drains open requests first)."""
    import os

    import uvicorn

    from birdgen.gateway.app import create_app
    from birdgen.gateway.settings import GatewaySettings

    settings = GatewaySettings.from_env(
        triton_url=args.url, redis_url=args.redis_url, rate_limit_per_minute=args.rate_limit
    )
    port = args.port or int(os.environ.get("BIRDGEN_GATEWAY_PORT", "8080"))
    uvicorn.run(create_app(settings), host=args.host, port=port, log_level="info")
    return 0


def _pregenerate(args: argparse.Namespace) -> int:
    """Exit 0 when every item is done, 1 when some failed or catalogue rows were skipped."""
    from birdgen.client.pregenerate import parse_option, pregenerate_catalogue
    from birdgen.qa.command import gate_from_args

    options = {kind: dict(map(parse_option, getattr(args, kind))) for kind in ("image", "animation")}
    summary = pregenerate_catalogue(
        args.catalog,
        args.out,
        url=args.url,
        kinds=[kind.strip() for kind in args.kinds.split(",") if kind.strip()],
        options=options,
        limit=args.limit,
        concurrency=args.concurrency,
        retries=args.retries,
        deadline_s=args.timeout,
        redis_url=args.redis_url if args.to_cache else None,
        write_files=not args.no_files,
        gate=gate_from_args(args, options["image"]),
    )
    return summary.exit_code


def _check_stubs(args: argparse.Namespace) -> int:
    """Exit 1 naming the python-backend stubs that died under a tritonserver: Triton does not restart
    them and its health endpoints stay 200, so this is the server container's liveness check."""
    from birdgen.process_group import dead_stubs

    dead = dead_stubs(args.pid)
    if dead:
        print(
            f"python-backend stub(s) {', '.join(map(str, dead))} died under tritonserver; their model "
            "instances fail every request until the server restarts",
            file=sys.stderr,
        )
        return 1
    return 0


def _train_lora(args: argparse.Namespace) -> int:
    """Flags map 1:1 onto TrainConfig fields; flags not given keep TrainConfig's defaults."""
    from dataclasses import fields

    from birdgen.training.config import TrainConfig
    from birdgen.training.lora import train_lora

    names = {f.name for f in fields(TrainConfig)}
    settings = {k: v for k, v in vars(args).items() if k in names and v is not None}
    result = train_lora(TrainConfig(**settings))
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(
        f"trained {args.family or 'all-families'} LoRA on {result.accepted} photos ({result.rejected} "
        f"rejected, reasons in training_card.json): steps {result.start_step} -> {result.global_step}, "
        f"final loss {loss}, {result.seconds:.0f} s; wrote {result.lora_path}"
    )
    return 0


def _add_request_arguments(parser: argparse.ArgumentParser, request: type) -> None:
    """One flag per scalar field of the request schema (the schema is the single source of the
    fields); a structured field (`control`) gets flags of its own (_add_control_arguments)."""
    for name, field in request.model_fields.items():
        types = (field.annotation, *get_args(field.annotation))
        kind = next((k for k in (int, float, str) if k in types), None)
        if kind is None:
            continue
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, required=field.is_required())


def _add_control_arguments(parser: argparse.ArgumentParser) -> None:
    """Per ControlNet kind: its picture as a file or a pose template (one of the two), and its
    settings; `image_request_fields` turns them into the request's `control`."""
    limits = LIMITS.control
    poses = ", ".join(VOCABULARY.allowed("pose"))
    for word, kind in CONTROL_FLAGS.items():
        group = parser.add_argument_group(f"{kind} ControlNet (docs/controlnet.md)")
        source = group.add_mutually_exclusive_group()
        source.add_argument(
            f"--control-{word}",
            dest=f"control_{word}",
            type=Path,
            metavar="FILE",
            help=f"a PNG or JPEG {kind} control picture (stretched to the image size)",
        )
        source.add_argument(
            f"--{word}-template",
            dest=f"{word}_template",
            metavar="POSE",
            help=f"draw the {kind} control picture from a pose template: {poses}",
        )
        defaults = {
            "scale": f"{limits.kinds[kind].scale_default:g}",
            "start": f"{limits.start.default:g}",
            "end": f"{limits.end.default:g}",
        }
        for key in CONTROL_SETTINGS:
            group.add_argument(
                f"--control-{word}-{key}",
                dest=f"control_{word}_{key}",
                type=float,
                metavar="SCALE" if key == "scale" else "FRACTION",
                help=f"{CONTROL_HELP[key]} (default {defaults[key]})",
            )


def build_parser() -> argparse.ArgumentParser:
    from birdgen.engines import ENGINE_KINDS  # no torch: the kinds import theirs when used

    parser = argparse.ArgumentParser(prog="birdgen", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("tiny-model", help="write a random-weight SDXL-Turbo folder (tiny, mini, full)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=20261125)
    p.add_argument(
        "--preset", default="tiny", help="tiny (tests), mini (CPU benchmarks), sdxl-full (real shapes)"
    )
    p.set_defaults(run=_tiny_model)

    p = commands.add_parser("export", help="export a diffusers SDXL folder to a Triton model repository")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=DEFAULT_REPO)
    p.add_argument("--engine", default="onnxruntime", choices=ENGINE_KINDS)
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="where the stages are hosted (torch: KIND_GPU fp16 with CUDA graphs on cuda; "
        "default: cuda when this machine has one, cpu for onnxruntime)",
    )
    p.add_argument(
        "--entry-instances",
        type=int,
        default=4,
        help="bird_image instances: concurrent requests whose UNet calls can batch together",
    )
    p.add_argument("--force", action="store_true", help="re-export stages even when up to date")
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        help="stages built at once, each in its own process (default 1: each holds its model, and an "
        "ONNX export of a real SDXL UNet takes tens of GB)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FAMILY=PATH",
        help="fuse a family LoRA into its own UNet (unet_<family>); repeat per family",
    )
    p.add_argument(
        "--motion-adapter",
        type=Path,
        help="AnimateDiff SDXL motion adapter folder (default: MODEL_DIR/motion_adapter when present)",
    )
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="KIND=PATH",
        help=f"a diffusers SDXL ControlNet folder, KIND one of {', '.join(CONTROLNET_KINDS)} "
        "(default: MODEL_DIR/controlnet-KIND where present); repeat per kind",
    )
    p.add_argument(
        "--svd",
        type=Path,
        metavar="PATH",
        help="a Stable Video Diffusion folder (stable-video-diffusion-img2vid(-xt) layout) for the "
        "svd_* stages (default: MODEL_DIR/svd when present)",
    )
    p.add_argument(
        "--max-frames",
        type=int,
        help="longest clip this deployment serves, in frames (default: what the last export into "
        "this repository used, else the request limit, 120); lower it where GPU memory is short",
    )
    p.add_argument(
        "--signing-key",
        type=Path,
        metavar="FILE",
        help=f"sign {MANIFEST} with this Ed25519 private key PEM (birdgen keygen) into "
        f"{MANIFEST_SIGNATURE} [BIRDGEN_SIGNING_KEY]",
    )
    p.set_defaults(run=_export)

    p = commands.add_parser("keygen", help="make an Ed25519 key pair to sign exports with (docs/security.md)")
    p.add_argument("--out", type=Path, required=True, help="folder for the two PEM files")
    p.set_defaults(run=_keygen)

    p = commands.add_parser("serve", help="run tritonserver on a model repository until SIGINT/SIGTERM")
    p.add_argument("--model-repository", type=Path, default=DEFAULT_REPO)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.set_defaults(run=_serve)

    from birdgen import entrypoint

    p = commands.add_parser(
        "entrypoint",
        help="the server image's start: export for this GPU if needed, verify checksums, exec tritonserver",
    )
    entrypoint.add_arguments(p, ENGINE_KINDS)
    p.set_defaults(run=entrypoint.run)

    p = commands.add_parser(
        "gateway", help="the HTTP gateway: REST API, web page and batch jobs (settings: BIRDGEN_* env)"
    )
    p.add_argument("--url", help="Triton gRPC address (BIRDGEN_TRITON_URL; default localhost:8001)")
    p.add_argument("--redis-url", help="Redis for rate limits, jobs and the cache (BIRDGEN_REDIS_URL)")
    p.add_argument("--rate-limit", type=int, help="requests a minute per API key or client IP (default 60)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, help="(BIRDGEN_GATEWAY_PORT; default 8080)")
    p.set_defaults(run=_gateway)

    p = commands.add_parser("models", help="list, load or unload models on a running server")
    p.add_argument("action", choices=("list", "load", "unload"))
    p.add_argument("name", nargs="?", help="model name, e.g. unet_passeriformes (load/unload)")
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    p.set_defaults(run=_models)

    generate = commands.add_parser("generate", help="generate through a running server").add_subparsers(
        dest="kind", required=True
    )
    p = generate.add_parser("image", help="one bird image")
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=120.0)
    _add_request_arguments(p, ImageRequest)
    _add_control_arguments(p)
    p.set_defaults(run=_generate_image)
    p = generate.add_parser("animation", help="one bird animation (animated WebP / GIF + poster)")
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    p.add_argument("--out", type=Path, required=True, help="the WebP (or the GIF with --format gif)")
    p.add_argument("--gif", type=Path, help="also write the GIF here (needs --format both or gif)")
    p.add_argument("--poster", type=Path, help="also write the PNG poster frame here")
    p.add_argument("--timeout", type=float, default=300.0)
    _add_request_arguments(p, AnimationRequest)
    p.add_argument(
        "--image",
        type=Path,
        metavar="FILE",
        help="with --engine svd: a PNG or JPEG picture to animate (without it the server draws the "
        "still from the request's subject and --pose)",
    )
    p.set_defaults(run=_generate_animation)

    p = commands.add_parser("demo", help="tiny model -> export -> Triton -> one labelled image under --out")
    p.add_argument("--out", type=Path, default=Path("outputs"))
    p.add_argument("--model-dir", type=Path, help="a diffusers SDXL folder (default: build the tiny one)")
    p.set_defaults(run=_demo)
    from birdgen.benchmarks import command as bench
    from birdgen.qa import command as qa

    p = commands.add_parser("bench", help="served birdgen vs diffusers and the compute floor (benchmarks/)")
    bench.add_arguments(p)
    p.set_defaults(run=bench.main)
    p = commands.add_parser(
        "pregenerate", help="generate a species catalogue ahead of time, resumably (docs/pregenerate.md)"
    )
    p.add_argument("--catalog", type=Path, help="species CSV (default: the bundled sample catalogue)")
    p.add_argument("--kinds", default="image,animation", help="comma-separated: image, animation")
    p.add_argument("--out", type=Path, default=Path("outputs/pregenerated"), help="files + manifest.jsonl")
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--retries", type=int, default=3, help="retries per item after a retryable failure")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline per request, seconds")
    p.add_argument("--limit", type=int, help="only the first N valid catalogue rows")
    for kind in ("image", "animation"):
        p.add_argument(
            "--" + kind, action="append", default=[], metavar="KEY=VALUE", help=f"{kind} request option"
        )
    p.add_argument("--to-cache", action="store_true", help="also store results in the Redis cache")
    p.add_argument("--redis-url", default="redis://localhost:6379/0")
    p.add_argument("--no-files", action="store_true", help="with --to-cache: the cache only, no files")
    qa.add_gate_arguments(p)
    p.set_defaults(run=_pregenerate)
    qa.add_parser(commands)
    p = commands.add_parser(
        "check-stubs", help="exit 1 if a python-backend stub died under tritonserver (docs/reliability.md)"
    )
    p.add_argument("--pid", type=int, help="the tritonserver's process id (default: every tritonserver)")
    p.set_defaults(run=_check_stubs)
    p = commands.add_parser(
        "train-lora", help="train one family's LoRA on licensed photos (docs/training.md)"
    )
    from dataclasses import fields

    from birdgen.training.config import LOGGERS, MIXED_PRECISION, TrainConfig

    train_defaults = {f.name: f.default for f in fields(TrainConfig)}
    p.add_argument("--model-dir", type=Path, required=True, help="the diffusers SDXL folder to adapt")
    p.add_argument("--data", dest="data_dir", type=Path, required=True, help="photos + metadata.jsonl/csv")
    p.add_argument("--output", dest="output_dir", type=Path, required=True)
    p.add_argument("--family", help="train on this family (an order) only; rows of others are rejected")
    for flag, kind in (
        ("rank", int), ("alpha", float), ("dropout", float), ("lr", float), ("warmup_steps", int),
        ("max_steps", int), ("batch_size", int), ("grad_accum", int), ("max_grad_norm", float),
        ("weight_decay", float), ("resolution", int), ("checkpoint_every", int), ("keep_checkpoints", int),
        ("seed", int), ("num_workers", int), ("min_side", int), ("min_sharpness", float), ("jitter", float),
    ):  # fmt: skip
        default = "the resolution" if flag == "min_side" else train_defaults[flag]
        p.add_argument("--" + flag.replace("_", "-"), type=kind, help=f"default {default}")
    p.add_argument(
        "--mixed-precision", choices=MIXED_PRECISION, help=f"default {train_defaults['mixed_precision']}"
    )
    p.add_argument(
        "--log-with", choices=LOGGERS, help=f"default {train_defaults['log_with']} (when installed)"
    )
    p.add_argument(
        "--resume", nargs="?", const="latest", metavar="latest|PATH", help="continue from a checkpoint"
    )
    p.add_argument(
        "--licence",
        dest="licences",
        action="append",
        help=f"allowed licence, repeatable (default {', '.join(train_defaults['licences'])})",
    )
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None)
    p.add_argument("--no-random-crop", dest="random_crop", action="store_false", default=None)
    p.set_defaults(run=_train_lora)
    return parser


def _quiet_libraries() -> None:
    """Weight-loading bars, exporter internals and deprecation notices from the libraries would bury
    birdgen's own progress lines; errors still show."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message="# The axis name")


def main(argv: Sequence[str] | None = None) -> int:
    from birdgen.client.errors import BirdgenError
    from birdgen.model_folder import ModelFolderError
    from birdgen.triton_install import TritonServerError

    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.run(args))
    except (BirdgenError, ModelFolderError, TritonServerError, ValueError, OSError) as exc:
        print(f"birdgen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
