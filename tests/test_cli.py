"""The `birdgen` command as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from birdgen.cli import animation_request_fields, build_parser, image_request_fields
from birdgen.client import BirdClient
from birdgen.client.calls import animation_call, image_call
from birdgen.media import read_metadata
from birdgen.server import free_port

BIRDGEN = [sys.executable, "-m", "birdgen.cli"]
ROBIN_ARGS = [
    "--species",
    "American Robin",
    "--scientific-name",
    "Turdus migratorius",
    "--pose",
    "perched",
    "--season",
    "spring",
    "--seed",
    "42",
    "--steps",
    "1",
    "--width",
    "256",
    "--height",
    "256",
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BIRDGEN, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.triton
def test_generate_image_with_a_pose_template_and_a_depth_file(server, tmp_path: Path) -> None:
    from PIL import Image

    depth = tmp_path / "depth.png"
    Image.new("RGB", (96, 64), (200, 200, 200)).save(depth)
    out = tmp_path / "posed.png"
    control = ["--pose-template", "flying", "--control-depth", str(depth), "--control-depth-scale", "0.4"]
    done = run("generate", "image", "--url", server.grpc_url, *ROBIN_ARGS, *control, "--out", str(out))
    assert done.returncode == 0, done.stderr
    applied = json.loads(done.stdout)["control"]
    assert applied["openpose"]["template"] == "flying" and applied["depth"]["scale"] == 0.4
    assert applied["depth"]["image_bytes"] == depth.stat().st_size
    assert read_metadata(out.read_bytes())["control"] == applied


@pytest.mark.triton
def test_generate_image_writes_the_file_and_prints_metadata(server, tmp_path: Path) -> None:
    out = tmp_path / "robin.png"
    done = run("generate", "image", "--url", server.grpc_url, *ROBIN_ARGS, "--out", str(out))
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["seed"] == 42 and printed["species"] == "American Robin"
    assert read_metadata(out.read_bytes())["prompt"] == printed["prompt"]


@pytest.mark.triton
def test_generate_eink_writes_the_preview_and_the_buffer(server, tmp_path: Path) -> None:
    eink = ["--format", "eink", "--eink-panel", "400x300", "--eink-dither", "ordered"]
    done = run(
        "generate", "image", "--url", server.grpc_url, *ROBIN_ARGS, *eink, "--out", str(tmp_path / "robin")
    )
    assert done.returncode == 0, done.stderr
    request = {"species": "American Robin", "scientific_name": "Turdus migratorius", "pose": "perched"}
    with BirdClient(server.grpc_url) as client:
        expected = client.generate_image(
            **request, season="spring", seed=42, steps=1, width=256, height=256,
            format="eink", eink_panel="400x300", eink_dither="ordered",
        )  # fmt: skip
    assert (tmp_path / "robin.png").read_bytes() == expected.data
    assert (tmp_path / "robin.bin").read_bytes() == expected.buffer
    assert json.loads(done.stdout)["eink"]["layout"]["row_bytes"] == 50
    assert "robin.bin (15000 bytes, 400x300, 1-bit)" in done.stderr


@pytest.mark.triton
def test_generate_with_prompt_override(server, tmp_path: Path) -> None:
    out = tmp_path / "robin.webp"
    done = run(
        "generate",
        "image",
        "--url",
        server.grpc_url,
        *ROBIN_ARGS,
        "--format",
        "webp",
        "--prompt",
        "a robin singing",
        "--negative-prompt",
        "cats",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert read_metadata(out.read_bytes())["prompt"] == "a robin singing"


def test_bad_value_is_one_line_naming_the_field(tmp_path: Path) -> None:
    done = run(
        "generate",
        "image",
        "--url",
        f"127.0.0.1:{free_port()}",
        *ROBIN_ARGS,
        "--pose",
        "upside-down",
        "--out",
        str(tmp_path / "x.png"),
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "'pose'" in done.stderr and "perched" in done.stderr


def test_unreachable_server_is_one_line_naming_the_url(tmp_path: Path) -> None:
    url = f"127.0.0.1:{free_port()}"
    done = run(
        "generate", "image", "--url", url, *ROBIN_ARGS, "--timeout", "5", "--out", str(tmp_path / "x.png")
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert url in done.stderr and len(done.stderr.strip().splitlines()) == 1


def image_args(*flags: str) -> dict[str, object]:
    """`birdgen generate image`'s request fields for `flags`, parsed in-process (no server)."""
    args = build_parser().parse_args(["generate", "image", *ROBIN_ARGS, "--out", "x.png", *flags])
    return image_request_fields(args)


def test_control_flags_build_the_request_control(tmp_path: Path) -> None:
    pose = tmp_path / "pose.png"
    Image.new("RGB", (32, 32)).save(pose)
    fields = image_args(
        "--control-pose", str(pose), "--control-pose-scale", "1.2", "--depth-template", "Singing",
        "--control-depth-start", "0.25", "--control-depth-end", "0.75",
    )  # fmt: skip
    assert fields["control"] == {
        "openpose": {"image": pose, "scale": 1.2},
        "depth": {"template": "Singing", "start": 0.25, "end": 0.75},
    }
    request = image_call(fields, {}).request  # the client base64-encodes and checks the file
    assert [(s.kind, s.source, s.scale) for s in request.control_settings()] == [
        ("openpose", "image", 1.2),
        ("depth", "template", 0.6),
    ]
    assert "control" not in image_args()  # no flags, no control: the request it always was
    assert image_args("--pose-template", "flying")["control"] == {"openpose": {"template": "flying"}}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--control-pose", "a.png", "--pose-template", "perched"], "not allowed with argument"),
        # The structured field has no flag of its own (only a prefix of the control flags).
        (["--control", "{}"], "ambiguous option: --control could match --control-pose,"),
    ],
)
def test_a_kind_takes_a_file_or_a_template_and_there_is_no_control_flag(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as done:
        image_args(*flags)
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_control_mistakes_are_one_line_before_any_server_is_asked(tmp_path: Path) -> None:
    (tmp_path / "pose.png").write_bytes(b"not a picture")
    url = f"127.0.0.1:{free_port()}"  # nothing listens: the errors below come before any call
    out = ["--url", url, *ROBIN_ARGS, "--out", str(tmp_path / "x.png")]
    for flags, named in (
        (
            ["--control-depth-scale", "0.5"],
            "--control-depth-scale needs --control-depth FILE or --depth-template",
        ),
        (["--control-pose", str(tmp_path / "pose.png")], "'control.openpose.image'"),
        (["--control-pose", str(tmp_path / "missing.png")], "missing.png (No such file"),
        (["--pose-template", "upside-down"], "'control.openpose.template'"),
    ):
        done = run("generate", "image", *out, *flags)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr and url not in done.stderr


def animation_args(*flags: str) -> dict[str, object]:
    """`birdgen generate animation`'s request fields for `flags`, parsed in-process (no server)."""
    args = build_parser().parse_args(
        ["generate", "animation", "--species", "American Robin", "--out", "x", *flags]
    )
    return animation_request_fields(args)


def test_engine_svd_and_image_flags_build_the_svd_request(tmp_path: Path) -> None:
    picture = tmp_path / "robin.png"
    Image.new("RGB", (48, 32), (200, 10, 10)).save(picture)
    fields = animation_args(
        "--engine", "svd", "--image", str(picture), "--motion-bucket-id", "90", "--noise-aug-strength",
        "0.05", "--decode-chunk-size", "4", "--min-guidance-scale", "1.5", "--max-guidance-scale", "2.5",
    )  # fmt: skip
    assert fields == {
        "species": "American Robin",
        "engine": "svd",
        "image": picture,
        "motion_bucket_id": 90,
        "noise_aug_strength": 0.05,
        "decode_chunk_size": 4,
        "min_guidance_scale": 1.5,
        "max_guidance_scale": 2.5,
    }
    request = animation_call(fields, {}, stream=False).request  # the client reads, encodes and checks it
    assert request.engine == "svd" and request.image is not None
    assert request.image.text == base64.b64encode(picture.read_bytes()).decode()
    assert (request.motion_bucket_id, request.decode_chunk_size) == (90, 4)
    # Without --image the server draws the still (--pose); without --engine it is AnimateDiff as ever.
    drawn = animation_call(animation_args("--engine", "SVD", "--pose", "singing"), {}, stream=False).request
    assert (drawn.engine, drawn.image, drawn.pose) == ("svd", None, "singing")
    assert animation_args("--behaviour", "flying") == {"species": "American Robin", "behaviour": "flying"}


def test_svd_image_mistakes_are_one_line_before_any_server_is_asked(tmp_path: Path) -> None:
    (tmp_path / "robin.png").write_bytes(b"not a picture")
    url = f"127.0.0.1:{free_port()}"  # nothing listens: the errors below come before any call
    out = ["--url", url, "--species", "American Robin", "--out", str(tmp_path / "x.webp")]
    for flags, named in (
        (["--engine", "svd", "--image", str(tmp_path / "robin.png")], "'image': got \"13 bytes starting"),
        (["--engine", "svd", "--image", str(tmp_path / "missing.png")], "missing.png (No such file"),
        (["--image", str(tmp_path / "robin.png")], "null with engine animatediff"),
    ):
        done = run("generate", "animation", *out, *flags)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr and url not in done.stderr
        assert "'image'" in done.stderr


def test_export_of_a_folder_missing_a_part_names_it(tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken, ignore=shutil.ignore_patterns("vae"))
    done = run("export", "--model-dir", str(broken), "--out", str(tmp_path / "repo"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'vae'" in done.stderr


def test_unknown_engine_kind_lists_the_allowed_ones(tiny_model: Path, tmp_path: Path) -> None:
    done = run("export", "--model-dir", str(tiny_model), "--out", str(tmp_path / "repo"), "--engine", "magic")
    assert done.returncode == 2 and "onnxruntime" in done.stderr and "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def one_instance_repository(
    repository: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The session repository re-exported (stages up to date, skipped) with one instance per entry
    model: `birdgen serve` loads every core model, and each instance is a process (~2.3 s to start)."""
    import shutil

    from birdgen.export.exporter import export_repository
    from tests.conftest import EXPORT_OPTIONS

    repo = tmp_path_factory.mktemp("one-instance") / "model_repository"
    shutil.copytree(repository, repo)
    export_repository(tiny_model, repo, **{**EXPORT_OPTIONS, "entry_instances": 1}, progress=lambda _: None)
    return repo


@pytest.mark.triton
@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_serve_runs_until_signalled_then_stops_cleanly(one_instance_repository: Path, signum: int) -> None:
    ports = [free_port() for _ in range(3)]
    serve = subprocess.Popen(
        [
            *BIRDGEN,
            "serve",
            "--model-repository",
            str(one_instance_repository),
            "--grpc-port",
            str(ports[0]),
            "--http-port",
            str(ports[1]),
            "--metrics-port",
            str(ports[2]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert "Triton ready" in serve.stdout.readline()
        with BirdClient(f"127.0.0.1:{ports[0]}") as client:
            assert (
                client.generate_image(species="Blue Jay", width=256, height=256).metadata["species"]
                == "Blue Jay"
            )
        serve.send_signal(signum)
        assert serve.wait(timeout=60) == 0
    finally:
        serve.kill()
    for port in ports:  # the server is gone, its ports are free again
        with socket.socket() as sock:
            # SO_REUSEADDR: closed connections may leave TIME_WAIT; a live listener still fails the bind.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()
