"""`birdgen export`: a diffusers SDXL folder -> a complete Triton model repository.

For each stage: build the engine from its torch module, check the engine against torch on random
inputs at two sizes (the max error goes into the manifest), write config.pbtxt. The entry model gets
the tokenizers, the scheduler config and a pipeline.json with everything it needs to run without the
source folder. A stage whose inputs (source files, engine settings, birdgen's export code, library
versions) are unchanged and whose files still match the manifest is skipped, so re-runs are fast.

`export_repository` runs in phases: resolve_inputs (every check; nothing written yet) -> plan_stages
(one StagePlan per engine stage, AnimateDiff's motion UNet being one more) -> base stages -> family
versions of the stages a LoRA changes -> entry models -> manifest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import birdgen
from birdgen.contracts import (
    ANIMATION_MODEL,
    ANIMATION_STREAM_MODEL,
    CONTROLLED_UNET,
    CONTROLNET_KINDS,
    IMAGE_MODEL,
    LORA_FILE,
    MANIFEST,
    MANIFEST_SIGNATURE,
    MOTION_ADAPTER,
    PIPELINE_FILE,
    SVD_FEATURE_EXTRACTOR_DIR,
    SVD_FOLDER,
    SVD_SCHEDULER_DIR,
    SVD_UNET,
    TOKENIZER_DIRS,
    controlnet_folder,
    controlnet_model,
    family_model,
)
from birdgen.engines import EngineKind, engine_kind
from birdgen.free_noise import CONTEXT_LENGTH
from birdgen.manifest import read_manifest, repository_files, sha256_file, tree_hashes
from birdgen.model_folder import (
    ModelDims,
    SvdDims,
    check_controlnet,
    check_model_folder,
    load_motion_adapter,
)
from birdgen.schema import ANIMATION, LIMITS, ServingLimits
from birdgen.signing import check_private_key, sign
from birdgen.stages import (
    SVD_MAX_FRAMES,
    StageSpec,
    control_stage_specs,
    image_sizes,
    motion_unet_spec,
    stage_specs,
    svd_info,
    svd_stage_specs,
)
from birdgen.triton_install import MODEL_BOOTSTRAP

if TYPE_CHECKING:
    from birdgen.export.lora import LoraInfo

MODEL_PY_DIR = Path(__file__).resolve().parent.parent / "model_repository"
# Copied into the entry model so the repository is self-contained.
BOOTSTRAP_MARKER = (
    "# birdgen: bootstrap (export replaces this line with birdgen.triton_install.MODEL_BOOTSTRAP)"
)
ENTRY_PARTS = (*TOKENIZER_DIRS, "scheduler")
# Versions kept on disk of what roll-outs change (family UNets, the entry): served one + previous one.
KEEP_VERSIONS = 2
# An engine may differ from torch by float reordering only; anything above this is an export bug.
CHECK_TOLERANCE = {"FP32": 1e-3, "UINT8": 1}
# Clip lengths the motion UNet is traced and checked at: three context windows (so no window axis is
# traced at 1 and frozen), and 18 frames, whose last window is a tail window.
CLIP_FRAMES = (24, 18)
# Where the SVD stages are traced and checked: (batch, (latent height, latent width), frames, decode
# chunk). The smallest request size (256 px): a decode costs chunk full-size frames; short clips,
# batch 2 (a clip's CFG halves) and every dynamic axis at two values, none equal to another's.
SVD_TRACE = (2, (32, 32), 3, 3)
SVD_CHECKS = ((1, (32, 32), 3, 2), (2, (32, 40), 5, 1))


def _versions() -> dict[str, str]:
    names = ("torch", "diffusers", "transformers", "onnx", "onnxruntime")
    return {n: metadata.version(n) for n in names} | {"birdgen": birdgen.__version__}


def stage_key(spec: StageSpec, source_parts: Iterable[Path], kind_name: str, settings: dict[str, Any]) -> str:
    """What a stage's artifacts are a function of; equal keys mean the export can be skipped."""
    engines = Path(birdgen.__file__).parent / "engines"  # the stage modules and every engine kind
    payload = {
        "stage": repr(spec),
        "kind": kind_name,
        "settings": settings,
        "versions": _versions(),
        "sources": {p.name: tree_hashes(p, p) for p in source_parts},
        "code": {"engines": tree_hashes(engines, engines.parent)},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _max_abs_error(
    spec: StageSpec,
    got: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    tolerance: Mapping[str, float] = CHECK_TOLERANCE,
) -> float:
    worst = 0.0
    for tensor in spec.outputs:
        diff = np.abs(got[tensor.name].astype(np.float64) - want[tensor.name].astype(np.float64)).max()
        if diff > tolerance[tensor.dtype]:
            raise RuntimeError(
                f"{spec.name}: engine output '{tensor.name}' differs from torch by {diff:g} "
                f"(tolerance {tolerance[tensor.dtype]})"
            )
        worst = max(worst, float(diff))
    return worst


def _sample(
    spec: StageSpec,
    dims: ModelDims | SvdDims,
    batch: int,
    latent: tuple[int, int],
    frames: int,
    chunk: int = 0,
) -> dict[str, np.ndarray]:
    sizes = image_sizes(dims, *latent, frames, chunk)
    return spec.sample_inputs(
        min(batch, spec.max_batch_size), sizes, getattr(dims, "vocab_size", 1), seed=batch
    )


def check_engine(spec: StageSpec, module: Any, engine: Any, dims: ModelDims | SvdDims) -> float:
    """Max |engine - torch| over random inputs at two batch sizes and two spatial sizes (and clip
    lengths); `dims` are the ones the stage's sizes derive from (SvdDims for the SVD stages)."""
    import torch

    worst = 0.0
    checks = (
        SVD_CHECKS
        if isinstance(dims, SvdDims)
        else ((1, (64, 64), CLIP_FRAMES[0], 0), (2, (32, 48), CLIP_FRAMES[1], 0))
    )
    for batch, latent, frames, chunk in checks:
        sample = _sample(spec, dims, batch, latent, frames, chunk)
        with torch.no_grad():
            outs = module(*(torch.from_numpy(sample[t.name]) for t in spec.inputs))
        want = {t.name: o.numpy() for t, o in zip(spec.outputs, outs, strict=True)}
        # An fp16 engine (tensorrt) names its own, looser tolerance.
        tolerance = getattr(engine, "tolerance", CHECK_TOLERANCE)
        worst = max(worst, _max_abs_error(spec, engine.infer(sample), want, tolerance))
    return worst


def write_model_py(template: str, version_dir: Path) -> Path:
    """model_repository/<template>/model.py with the venv bootstrap the python-backend stub needs."""
    text = (MODEL_PY_DIR / template / "model.py").read_text()
    if BOOTSTRAP_MARKER not in text:
        raise RuntimeError(f"model_repository/{template}/model.py lacks the line {BOOTSTRAP_MARKER!r}")
    path = version_dir / "model.py"
    path.write_text(text.replace(BOOTSTRAP_MARKER, MODEL_BOOTSTRAP.rstrip("\n")))
    return path


def _write(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a reader (or a live server) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _build_stage(
    spec: StageSpec,
    module: Any,
    kind: Any,
    dims: ModelDims | SvdDims,
    version_dir: Path,
    base: tuple[Path, list[str]] | None = None,
) -> dict[str, Any]:
    """Build one engine into `version_dir`, check it against `module`, return its manifest record.

    With `base` (a built version folder, and the weights of `module` that differ from the module
    built there), the kind may derive the engine from that one instead (EngineKind.derive); a
    derivation the kind refuses, or whose check fails, falls back to a build.
    """
    version_dir.mkdir(parents=True)
    if base is not None:
        record = _derived_stage(spec, module, kind, dims, version_dir, *base)
        if record is not None:
            return record
    trace = SVD_TRACE if isinstance(dims, SvdDims) else (2, (64, 64), CLIP_FRAMES[0], 0)
    sample = _sample(spec, dims, *trace)
    artifacts = kind.build(spec, module, sample, version_dir)
    error = check_engine(spec, module, kind.load(spec, version_dir), dims)
    write_model_py("stage", version_dir)
    return {"max_abs_error": error, "artifacts": {p.name: sha256_file(p) for p in artifacts}}


def _derived_stage(
    spec: StageSpec,
    module: Any,
    kind: Any,
    dims: ModelDims | SvdDims,
    version_dir: Path,
    base_dir: Path,
    names: list[str],
) -> dict[str, Any] | None:
    """`_build_stage`'s record for an engine derived from `base_dir`'s; None (and `version_dir`
    emptied) when the kind cannot derive it or the derived engine is not `module`."""
    state = module.state_dict()
    if not names or any(name not in state for name in names):
        return None
    weights = {name: state[name].detach().cpu().numpy() for name in names}
    artifacts = kind.derive(spec, base_dir, weights, version_dir)
    try:
        if artifacts is not None:
            error = check_engine(spec, module, kind.load(spec, version_dir), dims)
            write_model_py("stage", version_dir)
            return {
                "max_abs_error": error,
                "artifacts": {p.name: sha256_file(p) for p in artifacts},
                "weights_into": f"{base_dir.parent.name}/{base_dir.name}",
            }
    except RuntimeError:  # the check: the derived engine is not the module
        pass
    shutil.rmtree(version_dir)
    version_dir.mkdir()
    return None


@dataclass(frozen=True)
class StagePlan:
    """One engine stage to export: everything in which stages differ, so the export loops treat the
    SDXL stages and AnimateDiff's motion UNet alike."""

    spec: StageSpec
    sources: tuple[Path, ...]  # what the engine is built from: their files key the export cache
    module: Callable[[], Any]  # the stage's torch module; loaded only when the engine is built
    # A family's LoRA-fused 2-D UNet -> this stage's module; None for stages a LoRA leaves alone.
    family_module: Callable[[Any], Any] | None = None
    # Where a family's version of this stage sits in the family's manifest record (None: the record
    # itself); the served layout, which the entry models and rollbacks read.
    family_slot: str | None = None
    # The dims the stage's sample and check sizes derive from: None for the model's (ModelDims),
    # SvdDims for the SVD stages.
    dims: SvdDims | None = None


@dataclass(frozen=True)
class ExportInputs:
    """Everything an export reads and checks before it writes anything."""

    model_dir: Path
    dims: ModelDims
    engine: str  # as asked for: the entry's pipeline.json names it
    kind: EngineKind
    loras: dict[str, LoraInfo]  # by canonical family name
    previous: dict[str, Any]  # the repository's manifest; {} before the first export
    adapter: Path | None  # the motion adapter: the motion UNet is exported when there is one
    motion_max_frames: int  # 0 without a motion adapter
    # ControlNet folders by kind, in CONTROLNET_KINDS order: their stages and controlled_unet are
    # exported when there is one.
    controlnets: dict[str, Path] = dataclasses.field(default_factory=dict)
    # The Stable Video Diffusion folder (docs/svd.md): its four stages are exported when there is one.
    svd: Path | None = None
    svd_dims: SvdDims | None = None

    @property
    def svd_info(self) -> dict[str, Any] | None:
        """manifest.json's and pipeline.json's `svd`: the SVD dims and longest clip, or None."""
        return None if self.svd_dims is None else svd_info(self.svd_dims, SVD_MAX_FRAMES)


def export_repository(
    model_dir: Path,
    out: Path,
    engine: str = "onnxruntime",
    device: str | None = None,
    loras: Mapping[str, Path] | None = None,
    motion_adapter: Path | None = None,
    max_frames: int | None = None,
    controlnets: Mapping[str, Path] | None = None,
    entry_instances: int = 4,
    serving: ServingLimits = LIMITS.serving,
    force: bool = False,
    progress: Callable[[str], None] = print,
    signing_key: Path | None = None,
    jobs: int = 1,
    svd: Path | None = None,
) -> dict[str, Any]:
    """Export `model_dir` (and any family LoRAs) into the Triton repository `out`; return the manifest.

    Families not named in `loras` keep the engines an earlier export gave them. A family whose LoRA
    changed gets a new model version beside the old one (Triton serves the newest; the previous one
    stays on disk for a rollback). Every LoRA is checked before anything is written, and each new
    version is built outside the repository and moved in whole, so a failure leaves nothing half-written.
    The AnimateDiff motion UNet is exported when a motion adapter is given or the folder has one
    (`<model_dir>/motion_adapter`, where the tiny model writes it); `max_frames` caps its clips below
    the request limit where GPU memory is short, and like the families it stays as an earlier export
    set it unless given again. `controlnets` (kind -> ControlNet folder; by default the folder's
    `controlnet-<kind>` ones, where the tiny model writes them) adds each kind's ControlNet stage and
    the UNet that takes their residuals. `svd` (a Stable Video Diffusion folder; by default the
    folder's `svd`, where the tiny model writes it; checked by check_svd_folder) adds the four SVD
    stages. `device` is where the stages will be hosted (see `engine_kind`).
    `serving` bounds the entry models' queues (limits.yaml's; a test passes a tiny one).
    With `signing_key` (an Ed25519 private key PEM, `birdgen keygen`) the manifest is signed into
    manifest.json.sig; without it an earlier signature is removed, since it no longer matches.
    `jobs` > 1 builds that many changed base stages at once, in separate processes: faster where
    there are cores and memory for it (each holds its stage's model, and an ONNX export of a real
    SDXL UNet takes tens of GB), so the default is one.
    """
    out = Path(out)
    if signing_key is not None:
        check_private_key(signing_key)  # before the export's minutes, not after them
    inputs = resolve_inputs(
        model_dir, out, engine, device, loras, motion_adapter, max_frames, controlnets, svd
    )
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_stages(inputs)
    stages = _export_stages(out, plans, inputs, force, jobs, progress)
    families = _export_families(out, plans, stages, inputs, force, progress)
    keys = "".join(s["key"] for s in stages.values())
    model_version = f"{inputs.model_dir.name}-{hashlib.sha256(keys.encode()).hexdigest()[:12]}"
    entries = _write_entry(out, inputs, model_version, entry_instances, families, serving)
    manifest = _write_manifest(out, inputs, model_version, entries, stages, families)
    _sign_manifest(out, signing_key, progress)
    return manifest


def resolve_inputs(
    model_dir: Path,
    out: Path,
    engine: str,
    device: str | None,
    loras: Mapping[str, Path] | None,
    motion_adapter: Path | None,
    max_frames: int | None,
    controlnets: Mapping[str, Path] | None = None,
    svd: Path | None = None,
) -> ExportInputs:
    """The folder, engine kind, LoRAs, motion, ControlNet and SVD settings, checked before anything is
    written."""
    from birdgen.catalogue import Catalogue
    from birdgen.export.lora import validate_loras

    model_dir = Path(model_dir).resolve()
    check_model_folder(model_dir)
    dims = ModelDims.from_folder(model_dir)
    kind = engine_kind(engine, device)
    families = _canonical_families(loras or {}, Catalogue.load())
    lora_infos = validate_loras(model_dir, families)
    previous = read_manifest(out)
    nets = _controlnet_folders(model_dir, controlnets or {})
    svd_dir = Path(svd).resolve() if svd else model_dir / SVD_FOLDER
    svd_dims = SvdDims.from_folder(svd_dir) if svd or svd_dir.is_dir() else None  # check_svd_folder
    video = {"svd": svd_dir if svd_dims else None, "svd_dims": svd_dims}
    adapter = Path(motion_adapter).resolve() if motion_adapter else model_dir / MOTION_ADAPTER
    if not (motion_adapter or adapter.is_dir()):  # no motion UNet, no animation entries
        return ExportInputs(model_dir, dims, engine, kind, lora_infos, previous, None, 0, nets, **video)
    frames = _motion_max_frames(adapter, max_frames or previous.get("motion_max_frames"))
    return ExportInputs(model_dir, dims, engine, kind, lora_infos, previous, adapter, frames, nets, **video)


def _controlnet_folders(model_dir: Path, given: Mapping[str, Path]) -> dict[str, Path]:
    """ControlNet folder by kind: `given` over the model folder's `controlnet-<kind>`; each checked."""
    unknown = sorted(set(given) - set(CONTROLNET_KINDS))
    if unknown:
        raise ValueError(f"ControlNet kind {unknown[0]!r}: allowed {', '.join(CONTROLNET_KINDS)}")
    folders = {}
    for kind in CONTROLNET_KINDS:
        folder = Path(given[kind]).resolve() if kind in given else model_dir / controlnet_folder(kind)
        if kind in given or folder.is_dir():
            check_controlnet(folder, model_dir)
            folders[kind] = folder
    return folders


def _motion_max_frames(adapter: Path, max_frames: int | None) -> int:
    """Frames a clip may have: the request limit unless the deployment asks for fewer (GPU memory).

    Context windows cover any length, provided the adapter's positional embedding spans one window.
    """
    span = int(load_motion_adapter(adapter).config.motion_max_seq_length)
    if span < CONTEXT_LENGTH:
        raise ValueError(
            f"{adapter}: motion_max_seq_length {span} is shorter than the "
            f"{CONTEXT_LENGTH}-frame context window"
        )
    shortest = ANIMATION.duration_seconds.min * ANIMATION.fps.min
    if max_frames is not None and not shortest <= max_frames <= ANIMATION.max_frames:
        raise ValueError(f"max_frames {max_frames}: allowed {shortest}..{ANIMATION.max_frames}")
    return max_frames or ANIMATION.max_frames


def plan_stages(inputs: ExportInputs) -> dict[str, StagePlan]:
    """The stages to export, in export order: SDXL's four, the motion UNet with an adapter, then each
    ControlNet and the UNet taking their residuals, then SVD's four with an SVD folder."""
    from birdgen.engines.modules import (
        STAGE_PARTS,
        SVD_STAGE_PARTS,
        ControlledUNet,
        UNet,
        controlled_unet_module,
        controlnet_module,
        motion_unet,
        motion_unet_module,
        stage_module,
        svd_stage_module,
    )

    model_dir = inputs.model_dir
    plans = {
        name: StagePlan(
            spec,
            sources=tuple(model_dir / part for part in STAGE_PARTS[name]),
            module=functools.partial(stage_module, model_dir, name),
            # A family LoRA changes the UNet only; its fused UNet is wrapped like the folder's.
            family_module=UNet if name == "unet" else None,
        )
        for name, spec in stage_specs(inputs.dims).items()
    }
    adapter = inputs.adapter
    if adapter is not None:

        def motion_family_module(unet: Any) -> Any:
            return UNet(motion_unet(unet, load_motion_adapter(adapter)), clip=True)

        plans["motion_unet"] = StagePlan(
            motion_unet_spec(inputs.dims, inputs.motion_max_frames),
            sources=(model_dir / "unet", adapter),
            module=functools.partial(motion_unet_module, model_dir, adapter),
            family_module=motion_family_module,
            family_slot="motion",
        )
    specs = control_stage_specs(inputs.dims, tuple(inputs.controlnets))
    for kind, folder in inputs.controlnets.items():
        name = controlnet_model(kind)
        plans[name] = StagePlan(
            specs[name], (folder,), functools.partial(controlnet_module, model_dir, folder)
        )
    if inputs.controlnets:
        plans[CONTROLLED_UNET] = StagePlan(
            specs[CONTROLLED_UNET],
            sources=(model_dir / "unet",),
            module=functools.partial(controlled_unet_module, model_dir),
            family_module=ControlledUNet,
            family_slot="controlled",
        )
    if inputs.svd is not None and inputs.svd_dims is not None:
        for name, spec in svd_stage_specs(inputs.svd_dims, SVD_MAX_FRAMES).items():
            _, part = SVD_STAGE_PARTS[name]
            module = functools.partial(svd_stage_module, inputs.svd, name)
            plans[name] = StagePlan(spec, (inputs.svd / part,), module, dims=inputs.svd_dims)
    return plans


def _current_record(out: Path, plan: StagePlan, inputs: ExportInputs, force: bool) -> dict[str, Any] | None:
    """The manifest's record of a base stage when its key and files are unchanged, else None."""
    version_dir = out / plan.spec.name / "1"
    key = stage_key(plan.spec, plan.sources, inputs.kind.name, inputs.kind.settings)
    previous = inputs.previous.get("stages", {}).get(plan.spec.name, {})
    if not force and previous.get("key") == key and _intact(version_dir, previous.get("artifacts", {})):
        return previous
    return None


def _export_stage(
    out: Path, plan: StagePlan, inputs: ExportInputs, progress: Callable[[str], None]
) -> dict[str, Any]:
    """Build a base stage (version 1) afresh; its manifest record."""
    spec, kind = plan.spec, inputs.kind
    start = time.perf_counter()
    version_dir = out / spec.name / "1"
    key = stage_key(spec, plan.sources, kind.name, kind.settings)
    progress(f"{spec.name}: exporting ({kind.name})")
    if version_dir.exists():
        shutil.rmtree(version_dir)
    dims = plan.dims or inputs.dims
    record = {"key": key, **_build_stage(spec, plan.module(), kind, dims, version_dir)}
    progress(
        f"{spec.name}: done in {time.perf_counter() - start:.1f}s, "
        f"max |engine - torch| = {record['max_abs_error']:.3g}"
    )
    return record


def _export_stages(
    out: Path,
    plans: dict[str, StagePlan],
    inputs: ExportInputs,
    force: bool,
    jobs: int,
    progress: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """Every base stage's record, building the changed ones (in `jobs` processes when more than one)."""
    from birdgen.triton_config import stage_config, to_pbtxt

    records: dict[str, dict[str, Any]] = {}
    for name, plan in plans.items():
        record = _current_record(out, plan, inputs, force)
        if record is not None:
            records[name] = record
            progress(f"{name}: up to date, skipped")
    stale = [name for name in plans if name not in records]
    if jobs > 1 and len(stale) > 1:
        records |= _export_in_processes(out, inputs, stale, jobs, progress)
    else:
        records |= {name: _export_stage(out, plans[name], inputs, progress) for name in stale}
    for plan in plans.values():
        # Cheap and derived from code, not from the engine: always rewritten so they never go stale.
        version_dir = out / plan.spec.name / "1"
        write_model_py("stage", version_dir)
        hosting = inputs.kind.triton_hosting(plan.spec)
        _write(out / plan.spec.name / "config.pbtxt", to_pbtxt(stage_config(plan.spec, inputs.dims, hosting)))
    return {name: records[name] for name in plans}


# Stages whose export takes longest go to the workers first, so the pool ends together: the motion
# UNet's dynamo trace (~60 s on 2 cores for the tiny model), the SVD UNet's (~35 s), then the UNets,
# then the rest.
_EXPORT_ORDER = ("motion_unet", SVD_UNET, CONTROLLED_UNET, "unet")


def _export_in_processes(
    out: Path, inputs: ExportInputs, names: list[str], jobs: int, progress: Callable[[str], None]
) -> dict[str, dict[str, Any]]:
    """Build `names` in `jobs` spawned processes, each with its share of the cores.

    Why processes: an export is mostly single-threaded Python (dynamo tracing, the ONNX optimiser),
    so threads would not overlap. Each worker re-plans its stage from `inputs` (plans hold closures,
    which do not pickle); its progress lines come back through a queue.
    """
    import multiprocessing
    import os
    import threading
    import warnings
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    order = sorted(names, key=lambda n: _EXPORT_ORDER.index(n) if n in _EXPORT_ORDER else len(_EXPORT_ORDER))
    inputs = dataclasses.replace(inputs, loras={})  # base stages do not read the LoRAs
    with context.Manager() as manager:
        messages = manager.Queue()
        relay = threading.Thread(target=_relay, args=(messages, progress), daemon=True)
        relay.start()
        try:
            with ProcessPoolExecutor(
                min(jobs, len(names)),
                mp_context=context,
                initializer=_worker_init,
                initargs=(messages, threads, warnings.filters),
            ) as pool:
                futures = {name: pool.submit(_worker_export_stage, out, inputs, name) for name in order}
                try:
                    return {name: futures[name].result() for name in names}
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)  # the rest waits for no one
                    raise
        finally:
            messages.put(None)
            relay.join()


def _relay(messages: Any, progress: Callable[[str], None]) -> None:
    while (message := messages.get()) is not None:
        progress(message)


_worker_messages: Any = None


def _worker_init(messages: Any, threads: int, warning_filters: list[Any]) -> None:
    """A worker prints nothing itself (its lines go to the parent) and warns as the parent does."""
    import warnings

    import torch

    global _worker_messages
    _worker_messages = messages
    warnings.filters[:] = warning_filters
    torch.set_num_threads(threads)


def _worker_export_stage(out: Path, inputs: ExportInputs, name: str) -> dict[str, Any]:
    return _export_stage(out, plan_stages(inputs)[name], inputs, _worker_messages.put)


def _export_families(
    out: Path,
    plans: Mapping[str, StagePlan],
    stages: Mapping[str, dict[str, Any]],
    inputs: ExportInputs,
    force: bool,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Every family's manifest record: the given LoRAs' fused stages exported, the others' kept."""
    from birdgen.export.lora import fused_unet

    records = dict(inputs.previous.get("families", {}))
    for family, info in inputs.loras.items():
        lora = {
            "family": family,
            "source": str(info.path),
            "sha256": info.sha256,
            "rank": info.rank,
            "layers": info.layers,
        }
        fuse = functools.partial(fused_unet, inputs.model_dir, info.path, family)
        # The stage wrappers hold the (motion) UNet as `model`; the LoRA changes the same 2D weights.
        changed = [f"model.{name}" for name in info.weights]
        record = dict(records.get(family, {}))
        for name, plan in plans.items():
            if plan.family_module is None:
                continue
            key = hashlib.sha256((stages[name]["key"] + info.sha256).encode()).hexdigest()
            slot = plan.family_slot
            previous = record if slot is None else record.get(slot, {})
            built = _export_family_version(
                out, family, plan, key, previous, lora, fuse, changed, inputs, force, progress
            )
            if slot is None:
                record.update(built)
            else:
                record[slot] = built
        records[family] = record
    return records


def _export_family_version(
    out: Path,
    family: str,
    plan: StagePlan,
    key: str,
    previous: dict[str, Any],
    lora: dict[str, Any],
    fuse: Callable[[], Any],
    changed: list[str],
    inputs: ExportInputs,
    force: bool,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """A family's version of `plan`'s stage (fused UNet or motion UNet) as a new model version; the
    previous record if unchanged.

    `fuse` gives the folder's UNet with the family's LoRA fused in; `changed` are the stage module's
    weights the LoRA changed: the engine is the base stage's with those replaced where the kind can
    (EngineKind.derive), else built. Built in a staging folder beside the repository and moved in
    whole; the oldest versions beyond KEEP_VERSIONS are pruned.
    """
    from birdgen.triton_config import stage_config, to_pbtxt

    assert plan.family_module is not None
    spec = dataclasses.replace(plan.spec, name=family_model(family, plan.spec.name))
    current = out / spec.name / str(previous.get("version", 0))
    if not force and previous.get("key") == key and _intact(current, previous.get("artifacts", {})):
        progress(f"{spec.name}: up to date (version {previous['version']}), skipped")
        return previous
    start = time.perf_counter()
    version = max(_version_dirs(out / spec.name), default=0) + 1
    progress(f"{spec.name}: fusing {lora['source']} (rank {lora['rank']}) and exporting version {version}")
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=out.parent)) / str(version)
    kind = inputs.kind
    try:
        base = (out / plan.spec.name / "1", changed)
        record = _build_stage(spec, plan.family_module(fuse()), kind, inputs.dims, staging, base)
        _write(staging / LORA_FILE, json.dumps(lora, indent=2, sort_keys=True) + "\n")
        _write(
            out / spec.name / "config.pbtxt",
            to_pbtxt(stage_config(spec, inputs.dims, kind.triton_hosting(plan.spec))),
        )
        staging.rename(out / spec.name / str(version))
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)
    for stale in _version_dirs(out / spec.name)[:-KEEP_VERSIONS]:
        shutil.rmtree(out / spec.name / str(stale))
    how = f" ({record['weights_into']} with the LoRA's weights)" if "weights_into" in record else ""
    progress(
        f"{spec.name}: version {version} done in {time.perf_counter() - start:.1f}s{how}, "
        f"max |engine - torch| = {record['max_abs_error']:.3g}"
    )
    return {"model": spec.name, "version": version, "key": key, "lora": lora, **record}


def _intact(version_dir: Path, artifacts: dict[str, str]) -> bool:
    return bool(artifacts) and all(
        (version_dir / name).is_file() and sha256_file(version_dir / name) == sha
        for name, sha in artifacts.items()
    )


def _write_manifest(
    out: Path,
    inputs: ExportInputs,
    model_version: str,
    entries: list[str],
    stages: dict[str, Any],
    families: dict[str, Any],
) -> dict[str, Any]:
    """manifest.json, written last: it lists (with checksums) every file the phases before wrote."""
    manifest = {
        "birdgen_version": birdgen.__version__,
        "model_version": model_version,
        "source": str(inputs.model_dir),
        "engine": inputs.kind.name,
        "dims": inputs.dims.to_dict(),
        "motion_max_frames": inputs.motion_max_frames,
        "controlnets": list(inputs.controlnets),
        "svd": inputs.svd_info,
        "entries": entries,
        "versions": _versions(),
        "stages": stages,
        "families": families,
        "files": repository_files(out),
    }
    _write(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _sign_manifest(out: Path, signing_key: Path | None, progress: Callable[[str], None]) -> None:
    """manifest.json.sig for the manifest just written, or none: a stale one would fail to verify."""
    path = out / MANIFEST_SIGNATURE
    if signing_key is None:
        path.unlink(missing_ok=True)
        return
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(sign((out / MANIFEST).read_bytes(), signing_key))
    temporary.replace(path)
    progress(f"{MANIFEST} signed with {signing_key} ({MANIFEST_SIGNATURE})")


def _canonical_families(loras: Mapping[str, Path], catalogue: Any) -> dict[str, Path]:
    """The LoRAs by canonical family name; an unknown name raises the catalogue's UnknownFamilyError."""
    return {catalogue.family(name): Path(path) for name, path in loras.items()}


def _version_dirs(model: Path) -> list[int]:
    """The numeric version folders of a Triton model, ascending."""
    return sorted(int(p.name) for p in model.glob("*") if p.is_dir() and p.name.isdigit())


def _write_entry(
    out: Path,
    inputs: ExportInputs,
    model_version: str,
    instances: int,
    families: dict[str, Any],
    serving: ServingLimits,
) -> list[str]:
    """The entry models' folders; returns their names.

    A family roll-out, or a re-export that changes the model version, gets new entry versions too:
    Triton's response cache (and birdgen's Redis cache) key on the entry's name and version, so
    serving the new version starts fresh instead of answering repeats with the previous engines' or
    LoRA's images and clips. `bird_animation` (and its streaming twin) exist when
    the motion UNet was exported.
    """
    from birdgen.contracts import ANIMATION_OUTPUTS, IMAGE_OUTPUTS, STREAM_OUTPUTS
    from birdgen.triton_config import entry_config, to_pbtxt

    served = {
        family: {"unet": record["version"], "motion_unet": record.get("motion", {}).get("version")}
        for family, record in sorted(families.items())
    }
    info = {
        "model_version": model_version,
        "engine": inputs.engine,
        "dims": inputs.dims.to_dict(),
        "motion_max_frames": inputs.motion_max_frames,
        "controlnets": list(inputs.controlnets),
        "svd": inputs.svd_info,
        "families": served,
    }
    entries = {IMAGE_MODEL: IMAGE_OUTPUTS}
    if inputs.motion_max_frames or inputs.svd:  # either animation engine
        entries |= {ANIMATION_MODEL: ANIMATION_OUTPUTS, ANIMATION_STREAM_MODEL: STREAM_OUTPUTS}
    # The SVD loop's scheduler config and CLIP normalisation travel with the entries, as SDXL's do.
    parts = {part: inputs.model_dir / part for part in ENTRY_PARTS}
    if inputs.svd is not None:
        parts |= {
            SVD_SCHEDULER_DIR: inputs.svd / "scheduler",
            SVD_FEATURE_EXTRACTOR_DIR: inputs.svd / "feature_extractor",
        }
    for name, outputs in entries.items():
        versions = _version_dirs(out / name)
        version = versions[-1] if versions else 1
        if versions and _entry_identity(out / name / str(version)) != (model_version, served):
            version += 1
        version_dir = out / name / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        for part, source in parts.items():
            if (version_dir / part).exists():
                shutil.rmtree(version_dir / part)
            shutil.copytree(source, version_dir / part)
        write_model_py(name, version_dir)
        _write(version_dir / PIPELINE_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
        decoupled = name == ANIMATION_STREAM_MODEL
        config = entry_config(name, instances, outputs, decoupled=decoupled, serving=serving)
        _write(out / name / "config.pbtxt", to_pbtxt(config))
        for stale in _version_dirs(out / name)[:-KEEP_VERSIONS]:
            shutil.rmtree(out / name / str(stale))
    return list(entries)


def _entry_identity(version_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """What an entry version serves: the model version and the family UNet versions."""
    path = version_dir / PIPELINE_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return info.get("model_version"), info.get("families")
