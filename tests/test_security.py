"""Issue 16's checks, on real files and processes: what is served is what was exported (and signed).

- A real tritonserver refuses to load a model whose engine changed by one byte, or whose version
  folder gained a file, with one log line naming the model, the file and both checksums, while the
  other models serve; with BIRDGEN_MANIFEST_PUBLIC_KEY set in its environment its stub processes
  refuse a manifest signed with another key (so they inherit tritonserver's environment).
- `load_stage` and the entry models check before any engine is opened; the entrypoint refuses to
  start on a missing or wrong signature or a changed manifest; `birdgen export` signs.
- Pickle is never read: pickled LoRAs and model folders with only pickle weights are refused with
  how to convert them; no code calls torch.load / pickle.load, and every from_pretrained of weights
  passes use_safetensors=True.
- `birdgen keygen` writes the private key readable by its owner only.

The shared `repository` is never changed: each test tampers with its own copy.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from birdgen.cli import main
from birdgen.contracts import MANIFEST, MANIFEST_SIGNATURE, PIPELINE_FILE, PUBLIC_KEY, SIGNING_KEY
from birdgen.export.exporter import export_repository
from birdgen.export.lora import LoraError
from birdgen.manifest import IntegrityError, read_signed_manifest, sha256_file, verify_manifest
from birdgen.model_folder import (
    PICKLE_SUFFIXES,
    WEIGHT_PARTS,
    ModelDims,
    ModelFolderError,
    check_model_folder,
    load_motion_adapter,
)
from birdgen.server import TritonServer
from birdgen.signing import PUBLIC_KEY_ENV, SIGNING_KEY_ENV, sign
from birdgen.stages import image_sizes, repository_specs
from tests.conftest import ENTRY_INSTANCES, EXPORT_OPTIONS
from tests.test_import_graph import modules

Keys = tuple[Path, Path]  # (private, public)


def keygen(folder: Path) -> Keys:
    assert main(["keygen", "--out", str(folder)]) == 0
    return folder / SIGNING_KEY, folder / PUBLIC_KEY


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return keygen(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return keygen(tmp_path_factory.mktemp("other-keys"))


def signed_copy(repository: Path, out: Path, private: Path) -> Path:
    """A copy of the shared repository (no bytecode caches) with its manifest signed by `private`."""
    shutil.copytree(repository, out, ignore=shutil.ignore_patterns("__pycache__"))
    (out / MANIFEST_SIGNATURE).write_bytes(sign((out / MANIFEST).read_bytes(), private))
    return out


def listed_sha(repo: Path, rel: str) -> str:
    return json.loads((repo / MANIFEST).read_text())["files"][rel]


def stage_args(repo: Path, model: str, stage: str | None = None) -> dict[str, str]:
    """What Triton passes a stage model's initialize (the fields load_stage reads)."""
    parameters = {"stage": stage or model, "engine": "onnxruntime"}
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    return {
        "model_config": json.dumps(config),
        "model_repository": str(repo / model),
        "model_version": "1",
        "model_name": model,
        "model_instance_kind": "CPU",
    }


# -- keys ---------------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    private, public = keygen(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    assert b"BEGIN PRIVATE KEY" in private.read_bytes() and b"BEGIN PUBLIC KEY" in public.read_bytes()
    before = private.read_bytes()
    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 2  # never overwritten
    assert private.read_bytes() == before


# -- signing at export, checking at the entrypoint ----------------------------------------------------


def test_export_signs_with_the_key_from_the_environment_and_drops_a_stale_signature(
    repository: Path,
    tiny_model: Path,
    keys: Keys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo, ignore=shutil.ignore_patterns("__pycache__"))
    argv = ["export", "--model-dir", str(tiny_model), "--out", str(repo)]
    argv += ["--entry-instances", str(ENTRY_INSTANCES), "--max-frames", str(EXPORT_OPTIONS["max_frames"])]
    # A public key is not a signing key: refused before any export work.
    assert main([*argv, "--signing-key", str(keys[1])]) == 2
    assert "not an unencrypted PEM private key" in capsys.readouterr().err
    monkeypatch.setenv(SIGNING_KEY_ENV, str(keys[0]))
    assert main(argv) == 0
    assert read_signed_manifest(repo, keys[1])["files"] == json.loads((repo / MANIFEST).read_text())["files"]
    assert verify_manifest(repo) == []  # the signature is not a file the manifest lists
    monkeypatch.delenv(SIGNING_KEY_ENV)
    export_repository(tiny_model, repo, **EXPORT_OPTIONS, progress=lambda _: None)
    assert not (repo / MANIFEST_SIGNATURE).exists()  # it would no longer match


def entrypoint(repo: Path, public_key: Path | None, monkeypatch: pytest.MonkeyPatch) -> int:
    if public_key is None:
        monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(PUBLIC_KEY_ENV, str(public_key))
    return main(["entrypoint", "--model-repository", str(repo), "--export", "never", "--dry-run"])


def test_entrypoint_serves_only_a_manifest_its_public_key_verifies(
    repository: Path,
    keys: Keys,
    other_keys: Keys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = signed_copy(repository, tmp_path / "repo", keys[0])
    assert entrypoint(repo, keys[1], monkeypatch) == 0
    assert f"{MANIFEST}'s signature verifies" in capsys.readouterr().out

    assert entrypoint(repo, other_keys[1], monkeypatch) == 3  # a key that did not sign it
    assert "signature does not verify" in capsys.readouterr().err

    manifest = repo / MANIFEST
    original = manifest.read_bytes()
    changed = json.loads(original)
    changed["model_version"] = "not-what-was-signed"
    manifest.write_text(json.dumps(changed, indent=2, sort_keys=True) + "\n")
    assert verify_manifest(repo) == []  # every checksum still matches: only the signature tells
    assert entrypoint(repo, keys[1], monkeypatch) == 3
    assert "signature does not verify" in capsys.readouterr().err
    assert entrypoint(repo, None, monkeypatch) == 0  # without the variable, no signature check
    capsys.readouterr()

    manifest.write_bytes(original)
    (repo / MANIFEST_SIGNATURE).unlink()
    assert entrypoint(repo, keys[1], monkeypatch) == 3
    err = capsys.readouterr().err
    assert f"{MANIFEST_SIGNATURE} is missing" in err and "exec" not in err


def test_entrypoint_refuses_an_added_file_and_removes_planted_bytecode(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A .pyc beside model.py would run instead of the checked source, and no checksum covers it."""
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo, ignore=shutil.ignore_patterns("__pycache__"))
    planted = repo / "unet" / "1" / "__pycache__" / "model.cpython-311.pyc"
    planted.parent.mkdir()
    planted.write_bytes(b"bytecode")
    assert entrypoint(repo, None, monkeypatch) == 0
    assert "removed 1 Python bytecode cache(s)" in capsys.readouterr().out
    assert not planted.parent.exists()
    (repo / "unet" / "1" / "model.onnx.data").write_bytes(b"weights from elsewhere")
    assert entrypoint(repo, None, monkeypatch) == 3
    assert "  unet/1/model.onnx.data" in capsys.readouterr().err


# -- checks at load -----------------------------------------------------------------------------------


def test_load_stage_checks_its_files_and_the_signature_before_any_engine_is_opened(
    repository: Path, keys: Keys, other_keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from birdgen.ensemble import triton_model
    from birdgen.ensemble.triton_model import load_stage

    repo = signed_copy(repository, tmp_path / "repo", keys[0])
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(keys[1]))
    spec, engine = load_stage(stage_args(repo, "text_encoder"))
    assert spec.name == "text_encoder" and engine is not None

    opened: list[str] = []
    monkeypatch.setattr(triton_model, "engine_kind", lambda name: opened.append(name))  # must not run

    def refused(model: str, match: str) -> None:
        with pytest.raises(IntegrityError, match=match) as info:
            load_stage(stage_args(repo, model))
        assert "\n" not in str(info.value)  # one log line

    weights = repo / "vae_decoder" / "1" / "model.onnx"
    weights.write_bytes(weights.read_bytes() + b"\0")
    refused("vae_decoder", r"refusing to load vae_decoder version 1: vae_decoder/1/model\.onnx has sha256")
    (repo / "unet" / "config.pbtxt").write_text("parameters: changed\n")
    refused("unet", r"unet/config\.pbtxt has sha256")
    (repo / "text_encoder_2" / "1" / "model.onnx").unlink()
    refused("text_encoder_2", r"text_encoder_2/1/model\.onnx is missing")

    monkeypatch.setenv(PUBLIC_KEY_ENV, str(other_keys[1]))
    refused(
        "text_encoder", f"refusing to load text_encoder version 1: {MANIFEST}'s signature does not verify"
    )
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(tmp_path / "nowhere.pub"))
    refused("text_encoder", "cannot read the public key")
    (repo / MANIFEST).write_bytes((repo / MANIFEST).read_bytes() + b"\n")  # same JSON, other bytes
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(keys[1]))
    refused("text_encoder", "signature does not verify")
    assert opened == []


def test_an_entry_model_checks_its_version_folder_too(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its tokenizers, scheduler config and pipeline.json decide what is drawn as much as an engine."""
    from birdgen.ensemble.runners import entry_pipeline

    monkeypatch.delenv(PUBLIC_KEY_ENV, raising=False)
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo, ignore=shutil.ignore_patterns("__pycache__"))
    version = max(int(p.name) for p in (repo / "bird_image").iterdir() if p.name.isdigit())
    info = repo / "bird_image" / str(version) / PIPELINE_FILE
    info.write_text(info.read_text().replace('"engine"', '"engine" ', 1))
    args = {"model_repository": str(repo / "bird_image"), "model_version": str(version)}
    with pytest.raises(IntegrityError, match=f"bird_image/{version}/{re.escape(PIPELINE_FILE)} has sha256"):
        entry_pipeline(args, object)


@pytest.mark.triton
def test_triton_refuses_changed_added_and_unsigned_files_and_serves_the_rest(
    repository: Path, keys: Keys, other_keys: Keys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    repo = signed_copy(repository, tmp_path / "repo", keys[0])
    engine = repo / "vae_decoder" / "1" / "model.onnx"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 1  # one bit of one weight
    engine.write_bytes(bytes(data))
    expected, actual = listed_sha(repo, "vae_decoder/1/model.onnx"), sha256_file(engine)
    (repo / "text_encoder_2" / "1" / "extra.py").write_text("print('not exported')\n")
    monkeypatch.setenv(PUBLIC_KEY_ENV, str(keys[1]))  # tritonserver's environment: its stubs inherit it

    def refused(client: grpcclient.InferenceServerClient, model: str) -> str:
        """Triton's error log line for the failed load (its stub and backend log the cause too)."""
        with pytest.raises(InferenceServerException, match=f"refusing to load {model} version 1"):
            client.load_model(model)
        log = server.log_text().splitlines()
        (line,) = [ln for ln in log if f"failed to load '{model}' version 1: " in ln]
        assert line.startswith("E") and f"refusing to load {model} version 1: " in line
        return line

    with (
        TritonServer(repo, model_control="explicit", load_models=["text_encoder"]) as server,
        grpcclient.InferenceServerClient(server.grpc_url) as client,
    ):
        line = refused(client, "vae_decoder")
        assert f"vae_decoder/1/model.onnx has sha256 {actual[:12]}, {MANIFEST} says {expected[:12]}" in line
        line = refused(client, "text_encoder_2")
        assert f"text_encoder_2/1/extra.py is not listed in {MANIFEST}" in line

        # The other models serve: the signed, intact text encoder answers.
        manifest = json.loads((repo / MANIFEST).read_text())
        spec = repository_specs(manifest)["text_encoder"]
        dims = manifest["dims"]
        sample = spec.sample_inputs(1, image_sizes(ModelDims.from_dict(dims), 8, 8), dims["vocab_size"])
        inputs = []
        for tensor in spec.inputs:
            value = sample[tensor.name]
            inputs.append(grpcclient.InferInput(tensor.name, list(value.shape), tensor.dtype))
            inputs[-1].set_data_from_numpy(value)
        result = client.infer("text_encoder", inputs)
        assert np.isfinite(result.as_numpy(spec.outputs[0].name)).all()

        # Signed with another key: the stub of a model loaded now sees the server's public key.
        (repo / MANIFEST_SIGNATURE).write_bytes(sign((repo / MANIFEST).read_bytes(), other_keys[0]))
        assert f"{MANIFEST}'s signature does not verify" in refused(client, "unet")
        assert client.is_model_ready("text_encoder")


# -- safetensors only ---------------------------------------------------------------------------------


def test_a_pickled_lora_is_refused_before_anything_is_written(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "lora"
    folder.mkdir()
    pickled = folder / "pytorch_lora_weights.bin"
    torch.save({"unet.down_blocks.1.attentions.0.to_q.lora.down.weight": torch.zeros(4, 8)}, pickled)
    out = tmp_path / "repo"
    argv = ["export", "--model-dir", str(tiny_model), "--out", str(out)]
    assert main([*argv, "--lora", f"passeriformes={folder}"]) == 2  # the LoRA's folder
    err = capsys.readouterr().err
    assert "pytorch_lora_weights.bin: not a .safetensors file" in err and "pickle formats" in err
    assert "weights_only=True" in err  # how to convert it
    for given in (pickled, pickled.with_suffix(".pt"), pickled.with_suffix(".ckpt")):
        if given != pickled:
            shutil.copyfile(pickled, given)
        with pytest.raises(LoraError, match="are refused because loading one can run any code"):
            export_repository(tiny_model, out, loras={"Passeriformes": given}, progress=lambda _: None)
    assert not out.exists()


def test_a_model_folder_with_only_pickle_weights_is_refused(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused by name, before anything is read: for export, training and the motion adapter alike."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_suffix(".bin"))
    with pytest.raises(ModelFolderError, match=r"part 'unet' has only pickle weights \(diffusion_pytorch"):
        check_model_folder(folder)
    argv = [
        "train-lora",
        "--model-dir",
        str(folder),
        "--data",
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "only pickle weights (diffusion_pytorch_model.bin)" in capsys.readouterr().err
    adapter = folder / "motion_adapter"
    for weights in adapter.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".pt"))
    with pytest.raises(ModelFolderError, match=r"only pickle weights.*safe_serialization=True"):
        load_motion_adapter(adapter)


def test_the_tiny_model_is_safetensors_only(tiny_model: Path) -> None:
    weights = [p for p in tiny_model.rglob("*") if p.suffix in (*PICKLE_SUFFIXES, ".safetensors")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert {p.parent.name for p in weights} >= set(WEIGHT_PARTS)


UNPICKLERS = {
    ("torch", "load"),
    ("pickle", "load"),
    ("pickle", "loads"),
    ("joblib", "load"),
    ("dill", "load"),
}
NO_WEIGHTS = ("Config", "Tokenizer", "Scheduler")  # from_pretrained of these reads JSON, not weights


def unsafe_loads(path: Path) -> list[str]:
    """Calls that could unpickle a file: torch.load, pickle.load(s) and friends, and from_pretrained
    without use_safetensors=True (diffusers and transformers fall back to a pickled .bin without it),
    unless the class reads no weights or the line says "# no weights"."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        safe = any(
            k.arg == "use_safetensors" and isinstance(k.value, ast.Constant) and k.value.value is True
            for k in node.keywords
        )
        if (name, node.func.attr) in UNPICKLERS or (
            node.func.attr == "from_pretrained"
            and not safe
            and not name.endswith(NO_WEIGHTS)
            and "# no weights" not in lines[node.lineno - 1]
        ):
            found.append(f"{path.name}:{node.lineno}: {name}.{node.func.attr}")
    return found


def test_no_code_unpickles_a_file() -> None:
    """Static, over every module of the code (tests aside): nothing unpickles a file."""
    assert [hit for path in modules().values() for hit in unsafe_loads(path)] == []


def test_the_unpickling_scan_sees_what_it_looks_for(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "import torch\nstate = torch.load(f)\nunet = UNet2DConditionModel.from_pretrained(p)\n"
        "ok = UNet2DConditionModel.from_pretrained(p, use_safetensors=True)\n"
        "tokenizer = CLIPTokenizer.from_pretrained(p)\nother = cls.from_pretrained(p)  # no weights\n"
    )
    assert unsafe_loads(path) == ["m.py:2: torch.load", "m.py:3: UNet2DConditionModel.from_pretrained"]
