"""torch engines: each stage's own torch module, fp16 with CUDA graphs on a GPU, float32 eager on CPU.

`build` writes the stage wrapper's weights (`model.safetensors`) and a recipe (`torch_module.json`):
which wrapper of birdgen.engines.modules, its options, and the class and config of the
diffusers/transformers model inside. `load` rebuilds the module from those two files alone, so a
repository needs neither the source folder nor pickled modules, real SDXL weights go through the same
code as the tiny model, and a family UNet is stored with its LoRA already fused.

On CUDA (a KIND_GPU instance) `load` prepares the module for speed (`optimise`): fp16, SDPA attention
with fused QKV projections where diffusers offers them, channels-last conv weights. The VAE decoder
stays float32 unless its config says fp16 is safe: diffusers' `force_upcast`, which the SDXL VAE sets
(its fp16 activations overflow) and an fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix in the folder's
`vae/`) clears. It then captures one CUDA graph per shape bucket (every batch size at each
CAPTURED_SIZES_PX size, `birdgen.stages.captured_sizes`), optionally of a torch.compile'd module,
so capture and compilation are paid at load; a request at another shape runs the eager module and
never compiles or captures. On CPU the rebuilt module runs as is, float32 and eager: what the
export's check compares with torch (exactly equal) and what the CPU parity tests run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from birdgen.engines.base import EngineKind, TensorEngine
from birdgen.engines.cpu_lock import CpuLock
from birdgen.engines.modules import (
    ControlledUNet,
    ControlNet,
    SvdImageEncoder,
    SvdUNet,
    SvdVaeDecoder,
    SvdVaeEncoder,
    TextEncoder,
    UNet,
    VaeDecoder,
)
from birdgen.stages import CAPTURED_SIZES_PX, StageSpec, TensorSpec, captured_sizes

RECIPE_FILE = "torch_module.json"
WEIGHTS_FILE = "model.safetensors"
DEVICES = ("cpu", "cuda")
# torch.compile modes usable under birdgen's own graph capture ("reduce-overhead" would capture twice).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
# Runs before a capture, so cuBLAS/cuDNN choose kernels and allocate workspaces outside the graph.
GRAPH_WARMUP_RUNS = 3
# Inputs an fp16 engine keeps in float32: the pipeline passes timesteps as float32 and diffusers
# builds the sinusoidal timestep embedding from them in float32.
FLOAT32_INPUTS = ("timestep",)
TORCH_TYPES = {"FP32": torch.float32, "FP16": torch.float16, "INT64": torch.int64, "UINT8": torch.uint8}

# Each stage wrapper of birdgen.engines.modules: its class, the attribute holding the library model,
# and the constructor options the recipe records.
WRAPPERS: dict[str, tuple[type[torch.nn.Module], str, tuple[str, ...]]] = {
    "TextEncoder": (TextEncoder, "model", ("pooled",)),
    "UNet": (UNet, "model", ("clip",)),
    "VaeDecoder": (VaeDecoder, "vae", ()),
    "ControlNet": (ControlNet, "model", ()),
    "ControlledUNet": (ControlledUNet, "model", ()),
    "SvdImageEncoder": (SvdImageEncoder, "model", ()),
    "SvdVaeEncoder": (SvdVaeEncoder, "vae", ()),
    "SvdUNet": (SvdUNet, "model", ()),
    "SvdVaeDecoder": (SvdVaeDecoder, "vae", ()),
}
# Wrappers around convolutional models: channels-last weights and inputs on CUDA.
CONV_WRAPPERS = (
    "UNet",
    "VaeDecoder",
    "ControlNet",
    "ControlledUNet",
    "SvdVaeEncoder",
    "SvdUNet",
    "SvdVaeDecoder",
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchSettings:
    """How the kind builds and serves; written into every recipe, so `load` needs nothing else."""

    device: str  # where Triton hosts the stage: "cuda" (KIND_GPU) or "cpu" (KIND_CPU)
    cuda_graphs: bool = True
    compile_mode: str | None = None  # None (eager kernels) or one of COMPILE_MODES
    captured_sizes_px: tuple[int, ...] = CAPTURED_SIZES_PX

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"torch engine device {self.device!r}; allowed: {', '.join(DEVICES)}")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode {self.compile_mode!r}; allowed: None, {', '.join(COMPILE_MODES)}")


def module_recipe(module: torch.nn.Module) -> dict[str, Any]:
    """What rebuilds `module` (a stage wrapper) without its source folder, weights aside."""
    wrapper = type(module).__name__
    if wrapper not in WRAPPERS:
        raise ValueError(f"the torch kind builds {', '.join(WRAPPERS)} stage modules, not {wrapper}")
    _, attribute, options = WRAPPERS[wrapper]
    inner = getattr(module, attribute)
    library = type(inner).__module__.split(".")[0]
    if library == "diffusers":
        config = json.loads(inner.to_json_string())
    elif library == "transformers":
        config = inner.config.to_dict()
    else:
        raise ValueError(f"{wrapper} wraps a {library} model; the torch kind rebuilds diffusers/transformers")
    return {
        "wrapper": wrapper,
        "options": {name: getattr(module, name) for name in options},
        "model": {"library": library, "class": type(inner).__name__, "config": config},
    }


def _empty_model(model: Mapping[str, Any]) -> torch.nn.Module:
    """The library model from its config, parameters not yet filled in."""
    import diffusers
    import transformers

    if model["library"] == "diffusers":
        return getattr(diffusers, model["class"]).from_config(model["config"])
    cls = getattr(transformers, model["class"])
    # SDPA is what from_pretrained picks for CLIP here too, so CPU engines equal the export's torch.
    return cls._from_config(cls.config_class.from_dict(model["config"]), attn_implementation="sdpa")


def rebuild(recipe: Mapping[str, Any], weights: Path) -> torch.nn.Module:
    """The stage module from its recipe and weights file (float32, CPU, eval mode)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    cls, _, _ = WRAPPERS[recipe["wrapper"]]
    # Parameters on the meta device: no random init of billions of weights that are overwritten next.
    # Buffers stay real, since the non-persistent ones (CLIP's position ids) are not in the weights.
    with init_empty_weights(include_buffers=False):
        module = cls(_empty_model(recipe["model"]), **recipe["options"])
    module.load_state_dict(load_file(weights), strict=True, assign=True)
    return module.eval()


def _half_safe(module: torch.nn.Module) -> bool:
    """False for a VAE whose config asks for float32 (diffusers' force_upcast; its default is True).
    SVD's temporal decoder runs in fp16 (StableVideoDiffusionPipeline upcasts the VAE to encode the
    conditioning picture only)."""
    if not isinstance(module, VaeDecoder | SvdVaeEncoder):
        return True
    return not module.vae.config.get("force_upcast", True)


def optimise(module: torch.nn.Module, device: torch.device, half: bool) -> torch.nn.Module:
    """The module prepared for serving on `device`: SDPA attention with fused QKV projections
    (diffusers models), channels-last conv weights, fp16 when `half` and the stage allows it."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    _, attribute, _ = WRAPPERS[type(module).__name__]
    inner = getattr(module, attribute)
    if hasattr(inner, "fuse_qkv_projections"):
        inner.fuse_qkv_projections()  # also installs FusedAttnProcessor2_0 (SDPA)
    elif hasattr(inner, "set_attn_processor"):
        inner.set_attn_processor(AttnProcessor2_0())
    dtype = torch.float16 if half and _half_safe(module) else torch.float32
    module.to(device=device, dtype=dtype)
    if type(module).__name__ in CONV_WRAPPERS:
        module.to(memory_format=torch.channels_last)
    return module.eval()


class CapturedShape:
    """One CUDA graph for one input-shape bucket: inputs are copied into its static buffers, the
    graph replays, and the outputs are copied out (the next replay overwrites them)."""

    def __init__(
        self, run: Callable[..., Sequence[torch.Tensor]], args: Sequence[torch.Tensor], pool: Any
    ) -> None:
        self.inputs = [a.clone() for a in args]  # clone keeps each input's memory format
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_RUNS):
                run(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = tuple(run(*self.inputs))

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for static, arg in zip(self.inputs, args, strict=True):
            static.copy_(arg)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)


def _shape_key(args: Sequence[torch.Tensor]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(a.shape) for a in args)


class TorchEngine(TensorEngine):
    """A stage's torch module on one device; `prepared` holds the shape buckets warmed at load."""

    def __init__(self, spec: StageSpec, module: torch.nn.Module, device: torch.device) -> None:
        self.spec = spec
        self.module = module
        self.device = device
        self.dtype = next(module.parameters()).dtype
        self.channels_last = device.type == "cuda" and type(module).__name__ in CONV_WRAPPERS
        self.prepared: dict[tuple[tuple[int, ...], ...], Callable[..., Sequence[torch.Tensor]]] = {}
        # On CPU the module uses every core: one CPU engine computes at a time (see cpu_lock).
        self.lock = CpuLock(active=device.type == "cpu")

    def _input(self, tensor: TensorSpec, value: torch.Tensor) -> torch.Tensor:
        dtype = value.dtype
        if dtype.is_floating_point and tensor.name not in FLOAT32_INPUTS:
            dtype = self.dtype
        value = value.to(device=self.device, dtype=dtype)
        # Float NCHW only: a ControlNet's uint8 HWC image, permuted to NCHW inside, is channels-last already.
        if self.channels_last and value.dim() == 4 and value.is_floating_point():
            value = value.contiguous(memory_format=torch.channels_last)
        return value

    def _output(self, tensor: TensorSpec, value: torch.Tensor) -> torch.Tensor:
        if tensor.dtype == "FP32":
            value = value.float()
        return value.contiguous()

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: torch.from_numpy(np.require(v, requirements=("C", "W"))) for k, v in inputs.items()}
        return {k: v.cpu().numpy() for k, v in self.infer_tensors(tensors).items()}

    @torch.inference_mode()
    def infer_tensors(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [self._input(t, inputs[t.name]) for t in self.spec.inputs]
        run = self.prepared.get(_shape_key(args), self.module)
        with self.lock:
            results = run(*args)
        outputs = {t.name: self._output(t, o) for t, o in zip(self.spec.outputs, results, strict=True)}
        if self.device.type == "cuda":
            # Finished before Triton (or the engine-time counter) takes the outputs.
            torch.cuda.current_stream(self.device).synchronize()
        return outputs

    def bucket_inputs(self, sizes_px: Sequence[int]) -> list[list[torch.Tensor]]:
        """Zero inputs for every batch size at every captured size, largest first (so the graphs'
        shared memory pool is sized by the first capture)."""
        buckets = [
            [
                self._input(t, torch.zeros((batch, *t.concrete(sizes)), dtype=TORCH_TYPES[t.dtype]))
                for t in self.spec.inputs
            ]
            for sizes in captured_sizes(self.spec, sizes_px)
            for batch in range(1, self.spec.max_batch_size + 1)
        ]
        return sorted(buckets, key=lambda args: sum(a.numel() for a in args), reverse=True)

    @torch.inference_mode()
    def prepare(self, settings: TorchSettings) -> None:
        """Compile and capture every shape bucket now, so no request pays for it."""
        run: Callable[..., Sequence[torch.Tensor]] = self.module
        buckets = self.bucket_inputs(settings.captured_sizes_px)
        if settings.compile_mode:
            import torch._dynamo

            # dynamic=False: one specialised graph per bucket, which needs a recompile budget of all of them.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(buckets))
            run = torch.compile(self.module, mode=settings.compile_mode, dynamic=False)
        pool = torch.cuda.graph_pool_handle() if settings.cuda_graphs else None
        for args in buckets:
            if not settings.cuda_graphs:
                run(*args)  # compiles this bucket
                self.prepared[_shape_key(args)] = run
                continue
            try:
                self.prepared[_shape_key(args)] = CapturedShape(run, args, pool)
            except RuntimeError as exc:  # e.g. a host sync inside the model: serve it uncaptured
                log.warning("%s: CUDA graph capture failed, serving eagerly: %s", self.spec.name, exc)
                self.prepared.clear()
                torch.cuda.synchronize(self.device)
                return


class TorchKind(EngineKind):
    name = "torch"

    def __init__(self, device: str | None = None, **settings: Any) -> None:
        """`device` None: CUDA where this machine has it (the export's target is where it serves)."""
        self.options = TorchSettings(
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"), **settings
        )

    @property
    def settings(self) -> dict[str, Any]:
        return asdict(self.options)

    def build(
        self, spec: StageSpec, module: Any, sample: Mapping[str, np.ndarray], out_dir: Path
    ) -> list[Path]:
        from safetensors.torch import save_file

        recipe = {**module_recipe(module), "settings": self.settings}
        weights = out_dir / WEIGHTS_FILE
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(weights))
        (out_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
        return [out_dir / RECIPE_FILE, weights]

    def load(self, spec: StageSpec, version_dir: Path, device: str = "cpu") -> TorchEngine:
        recipe = json.loads((version_dir / RECIPE_FILE).read_text())
        module = rebuild(recipe, version_dir / WEIGHTS_FILE)
        target = torch.device(device)
        if target.type != "cuda":
            return TorchEngine(spec, module, target)
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(target)  # one Triton instance per process: graphs and streams on its GPU
        settings = recipe["settings"]
        options = TorchSettings(**{**settings, "captured_sizes_px": tuple(settings["captured_sizes_px"])})
        engine = TorchEngine(spec, optimise(module, target, half=True), target)
        if options.cuda_graphs or options.compile_mode:
            engine.prepare(options)
        return engine

    def triton_hosting(self, spec: StageSpec) -> dict[str, Any]:
        gpu = self.options.device == "cuda"
        parameters = {"engine": self.name, "stage": spec.name}
        if gpu:
            # Inputs already on the GPU (another stage's outputs) reach the model there, through DLPack.
            parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
        return {"backend": "python", "parameters": parameters, "gpu": gpu}
