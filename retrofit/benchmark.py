"""Speed benchmark: images/s per batch size, batch-1 latency, peak memory and theoretical GFLOPs of models, with the
measured speed-up of each merged model next to its FLOPs ratio.

Method: every model is built (or loaded) once, in the requested dtype, on the requested device, with the SDPA
attention path. For each batch size all models are warmed up, then measured *alternately* (the order rotates each
repeat) in one process; each measurement is a block of forward passes under ``torch.inference_mode`` timed with
``time.perf_counter`` around CUDA synchronisations, and the reported images/s is the median over the repeats. An
out-of-memory batch size is reported and skipped. Peak memory = the model's weights + the peak extra memory of one
eager forward pass (CUDA: ``max_memory_allocated``; CPU: the running total of the tensor allocations and frees that
``torch.profiler`` records, whose peak the process' RSS does not show once the allocator holds freed memory).

This module needs only torch and transformers (plus retrofit's core); ``bench/speed.py`` runs it on a GPU machine
that has nothing else installed.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .atomic import hold_write_lock, releases_write_locks
from .errors import RetrofitError, brief, check_arguments, check_interrupted, log_to_stderr, shown
from .loading import DTYPES  # re-exported: bench scripts read it here
from .settings import (
    DTYPE_NAMES,
    BenchArgs,
    BenchSettings,
    check_device,
    check_dtype,
    from_options,
    model_list,
    parse_merges,
)


def _shapes() -> dict[str, tuple]:
    """Random-weight model shapes usable instead of a checkpoint (224x224 images), from the family registry
    (`Family.shapes`): name -> (family, config fields)."""
    from .families import FAMILIES

    return {name: (family, fields) for family in FAMILIES.values() for name, fields in family.shapes.items()}


SHAPES = _shapes()
SHAPE_PREFIXES = tuple(sorted({name.split("-")[0] + "-" for name in SHAPES}))
VIT_SHAPES = [name for name, (family, _) in SHAPES.items() if family.name == "vit"]  # ViTForImageClassification
SPEED_REPEATS = 5  # `images_per_second`'s timed passes, whose median a run's before/after table gives (`recipes`)


@dataclass
class Variant:
    """One model in one execution mode (eager or a torch.compile mode)."""

    name: str
    model: torch.nn.Module
    config: object
    compile_mode: str
    gflops: float
    baseline: str | None = None
    flops_ratio: float | None = None
    runner: Callable | None = None
    input_shape: tuple[int, int, int] | None = None  # (channels, height, width); default: the config's image size
    results: dict[int, dict] = field(default_factory=dict)
    latency_ms: dict[str, float | None] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name if self.compile_mode == "eager" else f"{self.name} [compile={self.compile_mode}]"


# ----------------------------------------------------------------------------------------------------------------
# Parsing user input
# ----------------------------------------------------------------------------------------------------------------


def parse_device(device: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`; a clear error if unknown (`settings.check_device`) or if CUDA is asked for where
    there is none."""
    check_device(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RetrofitError(f"--device {device} was asked for but this machine has no usable CUDA GPU; use cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise RetrofitError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(device)


def parse_dtype(dtype: str) -> torch.dtype:
    """`fp32`, `bf16` or `fp16` (also the torch spellings: `settings.DTYPE_NAMES`)."""
    check_dtype(dtype)
    return DTYPES[DTYPE_NAMES[dtype]]


# ----------------------------------------------------------------------------------------------------------------
# Building the models
# ----------------------------------------------------------------------------------------------------------------


def check_shape(spec: str) -> None:
    """Refuse a name that looks like a shape (``vit-…``, ``clip-…``, ``beit-…``) but is not one; checkpoints (a
    folder, a Hub id ``owner/name``) pass."""
    looks_like_shape = spec.startswith(SHAPE_PREFIXES) and "/" not in spec and not Path(spec).expanduser().exists()
    if looks_like_shape and spec not in SHAPES:
        raise RetrofitError(f"unknown model shape '{spec}'; shapes: {', '.join(SHAPES)} (or a checkpoint path/Hub id)")


def shape_config(name: str):
    """The config of a named shape (224x224 images, SDPA attention; classifiers with 1000 classes)."""
    from transformers import AutoConfig

    family, settings = SHAPES[name]
    head = next(iter(family.heads.values()))
    labels = {"num_labels": 1000} if head.is_classifier else {}
    size = {"image_size": 224} if head.layer_config == "config" else {}  # a dual encoder's is in its vision_config
    config = AutoConfig.for_model(family.model_types[0], **settings, **labels, **size)
    config._attn_implementation = "sdpa"
    config._name_or_path = name
    return config


def shape_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A model of a named shape with random weights (its family's first class, built directly on `device`)."""
    import transformers
    from accelerate import init_empty_weights

    from .loading import family_and_head
    from .naflex import take_images

    config = shape_config(name)
    with init_empty_weights(include_buffers=False):  # the parameters on the meta device, the buffers (RoPE's) not
        model = take_images(getattr(transformers, family_and_head(config)[1].class_name)(config))
    buffers = {key: buffer.clone() for key, buffer in model.named_buffers()}
    model.to_empty(device=device)
    for key, buffer in model.named_buffers():
        buffer.copy_(buffers[key])
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.dim() > 1 or "embeddings" in pname:
                param.normal_(0.0, 0.02, generator=generator)
            elif pname.endswith(("weight", "lambda1", "lambda_1", "lambda_2")):  # norms and layer scales
                param.fill_(1.0)
            else:
                param.zero_()
    return model.to(dtype).eval()


def load_bench_model(spec: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A shape name (random weights) or a checkpoint / retrofit export, on `device` in `dtype`, SDPA attention."""
    if spec in SHAPES:
        return shape_model(spec, device, dtype)
    check_shape(spec)
    from .loading import load_model

    try:
        model = load_model(spec, attn_implementation="sdpa", new_classifier_ok=True)  # (speed only)
    except (ValueError, TypeError):  # a model class without SDPA support
        model = load_model(spec, new_classifier_ok=True)
    return place_model(model, device, dtype)


def place_model(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | str) -> torch.nn.Module:
    """`model` moved to `device` and cast to `dtype` (names such as ``bf16`` or torch objects), in eval mode: how every
    measured model runs (`retrofit bench` and `retrofit sweep` alike)."""
    device = parse_device(device) if isinstance(device, str) else device
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    return model.to(device=device, dtype=dtype).eval()


def resolve_after_layer(config, after: str) -> int:
    """The layer index of a `--merge` K: an integer, or ``half`` for L // 2."""
    from .loading import family_and_head, layer_config

    layers = layer_config(config, family_and_head(config)[1]).num_hidden_layers
    return layers // 2 if after == "half" else int(after)


def checked_merge(config, after: str, tokens: int, image_size: tuple[int, int] | None = None) -> int:
    """The layer index of a ``--merge K:M`` (`resolve_after_layer`) that `config` can merge with M tokens at
    `image_size` (`surgery.check_merge`); else one line naming the option as it was given."""
    from .surgery import check_merge

    k, given = resolve_after_layer(config, after), f"--merge {after}:{tokens}"
    check_merge(config, k, tokens, image_size, names=(f"{given}: after-layer", f"{given}: tokens"))
    return k


def _model_key(spec: str) -> str:
    """What `spec` measures: a local file or folder (a shipped ``retrofit:NAME`` too) by its resolved path, anything
    else (a Hub id, a shape) as given."""
    from .loading import resolve_source

    try:
        path = Path(resolve_source(spec))
    except RetrofitError:  # (an unknown retrofit:NAME is refused where it is loaded)
        return spec
    return str(path.resolve()) if path.exists() else spec


def build_variants(
    models: list[str], merges: list[tuple[str, int]], settings: BenchSettings, *, log: Callable[[str], None] = print
) -> list[Variant]:
    """Load every model (and a merged twin per `merges` for each unmerged one) and wrap each in every compile mode.

    A model or merge setting given twice is measured once (a note says so), as sweep does with repeated values.
    `merges` apply to unmerged models only: a note names each already-merged model they skip, and if every model is
    merged they are refused.
    """
    from .cost import model_cost
    from .loading import is_merged, load_config
    from .provenance import made_from
    from .surgery import insert_patch_merger

    device, dtype = parse_device(settings.device), parse_dtype(settings.dtype)
    if not models:
        raise RetrofitError(
            "no models to benchmark; pass shape names (vit-b16, ...), checkpoint folders / Hub ids or .onnx files"
        )
    same = {}  # one model, however its folder is written (`ex`, `ex/`, `./ex`): the first spelling names it
    for spec in models:
        same.setdefault(_model_key(spec), []).append(spec)
    for spellings in same.values():
        names = list(dict.fromkeys(spellings))
        if len(names) > 1:
            log(f"note: {' and '.join(map(repr, names))} name one model; measuring it once, as '{spellings[0]}'")
        elif len(spellings) > 1:
            log(f"note: '{spellings[0]}' is given {len(spellings)} times; measuring it once")
    models = [spellings[0] for spellings in same.values()]
    onnx_files = [spec for spec in models if str(spec).endswith(".onnx")]  # run in ONNX Runtime, in their own mode
    models = [spec for spec in models if spec not in onnx_files]
    if onnx_files:
        from .deploy import check_onnx_file

        for spec in onnx_files:
            _check_onnx_dtype(spec, check_onnx_file(spec).get("dtype") or "fp32", DTYPE_NAMES[settings.dtype])
        if merges and not models:
            raise RetrofitError(
                "--merge adds merged twins of unmerged PyTorch models, and only ONNX files are given (each is "
                "measured as it is); drop --merge, or add the unmerged checkpoint"
            )
    # Check every model and merge setting before loading any weights; plan each unmerged model's twins (K, M).
    twins: dict[str, list[tuple[int, int]]] = {}
    merged_specs = []
    sizes: dict[str, tuple[int, int] | None] = {}  # the images each is timed on (None: its config's size)
    for spec in models:
        check_shape(spec)
        config = shape_config(spec) if spec in SHAPES else load_config(spec)
        sizes[spec] = None if spec in SHAPES else processor_size(spec, config)
        if is_merged(config):
            merged_specs.append((spec, str(getattr(config, "merge_source", "") or "")))
            continue
        twins[spec] = []
        for after, tokens in merges:
            k = checked_merge(config, after, tokens, sizes[spec])
            if (k, tokens) in twins[spec]:
                log(f"note: --merge {after}:{tokens} repeats after-layer {k}, {tokens} tokens for '{spec}'; skipped")
            else:
                twins[spec].append((k, tokens))
    if merges and merged_specs:
        if not twins:
            spec, source = merged_specs[0]
            hint = f", e.g. its source '{source}'" if source else ""
            raise RetrofitError(
                f"--merge adds merged twins of unmerged models, but '{spec}' is already merged and no unmerged model "
                f"is given; drop --merge, or add an unmerged model{hint}"
            )
        for spec, _ in merged_specs:
            log(f"note: '{spec}' is already merged; --merge applies to unmerged models only, it is measured as is")
    for spec in onnx_files if merges else []:
        log(f"note: '{spec}' is an ONNX file; --merge applies to unmerged PyTorch models only, it is measured as is")
    loaded: list[tuple[str, torch.nn.Module, str | None, tuple[int, int] | None]] = []
    for spec in models:
        log(f"loading {spec} ...")
        model = load_bench_model(spec, device, dtype)
        baseline = None
        if is_merged(model.config):  # its source among the models measured, if it is one
            baseline = next((m for m in twins if m not in SHAPES and made_from(model.config, m)), None)
        loaded.append((spec, model, baseline, sizes[spec]))
        for k, tokens in twins.get(spec, []):
            twin = place_model(
                insert_patch_merger(model, k, tokens, source=spec, image_size=sizes[spec]), device, dtype
            )
            loaded.append((f"{spec}+pm{k}:{tokens}", twin, spec, sizes[spec]))
    sources = [(name, _encoder_shape(model.config, size)) for name, model, _, size in loaded
               if not is_merged(model.config)]  # fmt: skip
    for index, (name, model, baseline, size) in enumerate(loaded):
        if baseline is None and is_merged(model.config) and sources:  # its source not found: one of its shape
            shape = _encoder_shape(model.config, size)
            baseline = next((source for source, theirs in sources if theirs == shape), None)
            if baseline is None:
                log(f"note: '{name}' was not made from any unmerged model given, and none has its encoder's shape "
                    "and image size: no speed-up for it; add its source to compare with")  # fmt: skip
            loaded[index] = (name, model, baseline, size)
    variants = []
    for mode in settings.compile_modes:
        for name, model, baseline, size in loaded:
            variant = Variant(
                name=name,
                model=model,
                config=model.config,
                compile_mode=mode,
                gflops=model_cost(model.config, size).gflops,
                baseline=baseline,
            )
            if size is not None:
                variant.input_shape = (_input_shape(variant)[0], *size)
            variants.append(variant)
    variants += _onnx_variants(onnx_files, settings, log)
    by_key = {(v.name, v.compile_mode): v for v in variants}
    for v in variants:
        base = by_key.get((v.baseline, v.compile_mode)) if v.baseline else None
        v.flops_ratio = base.gflops / v.gflops if base else None
    for v in variants:
        if v.runner is None:
            module = timed_part(v.model, v.config)
            v.runner = module if v.compile_mode == "eager" else _compile(module, v.compile_mode)
    return variants


def _encoder_shape(config, size: tuple[int, int] | None) -> tuple:
    """What a merged model's speed-up is measured against: its family, its encoder's dimensions (merge settings
    aside) and the size of the images it is timed on. A merged model is compared only with an unmerged one of the
    same shape (a speed-up over another model is not the merge's)."""
    from .cost import image_size
    from .loading import family_and_head, layer_config

    family, head = family_and_head(config)
    layers = layer_config(config, head)
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
            "num_channels")  # fmt: skip
    return (family.name, *(getattr(layers, key, None) for key in keys), tuple(size or image_size(layers)))


def processor_size(spec: str, config) -> tuple[int, int] | None:
    """The (height, width) of the images `spec`'s image processor gives it, which it is timed and priced at, as
    convert prices it and ``export-onnx`` traces it (a DINOv2 config says 518, its processor crops 224); None where
    it cannot tell (its config's size; without a processor, the one retrofit makes up has that size)."""
    from .loading import load_image_processor, processor_image_size

    return processor_image_size(load_image_processor(spec, config, log=lambda _: None))


def timed_part(model: torch.nn.Module, config) -> torch.nn.Module:
    """What is timed of `model`: a dual encoder's image embeddings (`_ImageTower`), any other model whole."""
    from .loading import is_dual_encoder

    return _ImageTower(model) if is_dual_encoder(config) else model


class _ImageTower(torch.nn.Module):
    """What `bench` times of a dual encoder (CLIP, SigLIP): its image embeddings, the part a merge speeds up (the
    text embeddings of a fixed set of prompts are computed once)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        from .zero_shot import image_embeddings

        return (image_embeddings(self.model, pixel_values),)


def _check_onnx_dtype(spec: str, graph: str, wanted: str) -> None:
    """Refuse an ONNX file whose graph is not in the dtype the run measures: ONNX Runtime runs it in its own, and
    the table would give its speed as the other dtype's."""
    if graph == wanted:
        return
    again = f", or write it again with `retrofit export-onnx MODEL --dtype {wanted}`" if wanted != "bf16" else ""
    raise RetrofitError(
        f"--dtype {wanted}: '{spec}' holds an {graph} graph, which ONNX Runtime runs in {graph} whatever --dtype "
        f"says; pass --dtype {graph} to time it{again}"
    )


def _onnx_variants(files: list[str], settings: BenchSettings, log: Callable[[str], None]) -> list[Variant]:
    """ONNX files retrofit wrote (`retrofit.deploy`), run in ONNX Runtime; a merged one's baseline is the file of
    its source among them (by the hash of the source's weights each file records)."""
    if not files:
        return []
    from .deploy import OnnxModel

    variants = []
    for spec in files:
        log(f"loading {spec} (ONNX Runtime) ...")
        model = OnnxModel(spec, settings.device)
        variants.append(Variant(spec, model, model.config, "onnxruntime", model.info["gflops"], runner=model,
                                input_shape=model.input_shape))  # fmt: skip
    for v in variants:
        wanted = v.model.info.get("merge_source_sha256")
        v.baseline = next((b.name for b in variants if wanted and b.model.info.get("weights_sha256") == wanted), None)
    return variants


def _compile(model: torch.nn.Module, mode: str) -> Callable:
    return torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


def _forward(runner: Callable, pixel_values: torch.Tensor) -> torch.Tensor:
    """One forward pass (the unit every timing measures); the logits of a classifier, a backbone's last hidden state,
    a dual encoder's image embeddings."""
    return runner(pixel_values=pixel_values)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    # "storage size calculation overflowed": a batch of more bytes than any memory holds (e.g. --batch-size 1e20)
    memory = ("out of memory", "can't allocate memory", "storage size calculation overflowed")
    return isinstance(exc, RuntimeError) and any(phrase in text for phrase in memory)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _input_shape(v: Variant) -> tuple[int, int, int]:
    """The (channels, height, width) a variant is timed on: its own, or its config's image size."""
    if v.input_shape is not None:
        return v.input_shape
    from .cost import image_size
    from .loading import family_and_head, image_channels, layer_config

    height, width = image_size(layer_config(v.config, family_and_head(v.config)[1]))
    return (image_channels(v.config), height, width)


def _time_block(runner: Callable, x: torch.Tensor, iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        _forward(runner, x)
    _sync(device)
    return time.perf_counter() - start


def rss_mib(key: str) -> float | None:
    """A memory figure of this process (``VmRSS``, or ``VmHWM``: peak RSS) in MiB, from /proc; None off Linux."""
    try:
        match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) / 1024 if match else None
    except OSError:
        return None


def _weights_mib(model: torch.nn.Module) -> float:
    """The MiB of a PyTorch model's parameters and buffers (an ONNX graph's peak memory is not measured)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _peak_memory_mib(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float | None:
    """Weights + peak extra memory of one eager forward pass on `x`."""
    weights = _weights_mib(model)
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _forward(model, x)
        _sync(device)
        return weights + (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _c_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        _forward(model, x)
    running = peak = 0
    for event in sorted(recorded.events(), key=lambda event: event.time_range.start):
        running += event.self_cpu_memory_usage  # allocations minus frees, in the order they happened
        peak = max(peak, running)
    return weights + peak / 2**20


@contextlib.contextmanager
def _c_stderr_silenced() -> Iterator[None]:
    """Silence the process' stderr at the file-descriptor level: the profiler's C++ side (Kineto) prints a line
    when it starts and stops, which no setting turns off. Python errors still raise as usual."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def images_per_second(
    models: dict[str, torch.nn.Module],
    *,
    batch_size: int,
    image_size: tuple[int, int] | None = None,
    repeats: int = SPEED_REPEATS,
    device: str = "cpu",
    dtype: str = "fp32",
    spreads: dict[str, float | None] | None = None,
) -> dict[str, float | None]:
    """Forward throughput of in-memory models on random images, measured alternately with `run_benchmark` (the one
    timer retrofit has): one warm-up pass, then the median of `repeats` timed passes, each model in turn. `spreads`,
    if given, gets each model's `spread` of its passes (None where not measured). The models are handed back on the
    device, in the dtype and in the mode they came in: a run times its bf16 teacher in float32, then distils from it in
    bf16, as finetune does."""
    settings = BenchSettings(device=device, dtype=dtype, batch_sizes=(batch_size,), warmup=1, repeats=repeats,
                             min_time=0.0, latency_iters=0)  # fmt: skip
    variants = []
    placed = {id(model): (model, *_placement(model)) for model in models.values()}  # before any (shared weights)
    try:
        for name, model in models.items():
            runner = timed_part(place_model(model, device, dtype), model.config)
            variant = Variant(name, model, model.config, "eager", 0.0, runner=runner)
            if image_size is not None:
                variant.input_shape = (_input_shape(variant)[0], *image_size)
            variants.append(variant)
        run_benchmark(variants, settings, log=lambda _: None)
    finally:
        for model, where, training in placed.values():
            _restore_placement(model, where, training)
    if spreads is not None:
        spreads.update({v.name: spread(v.results[batch_size]) for v in variants})
    return {v.name: v.results[batch_size].get("images_per_s") for v in variants}


def _placement(model: torch.nn.Module) -> tuple[dict[str, tuple[torch.device, torch.dtype]], bool]:
    """Where each parameter and buffer of `model` is (by name), in which dtype, and whether it is training: what
    `images_per_second` hands back (a model of several dtypes, e.g. a float32 merger in a bf16 model, keeps them)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return {name: (tensor.device, tensor.dtype) for name, tensor in tensors}, model.training


def _restore_placement(model: torch.nn.Module, where: dict, training: bool) -> None:
    """Put `model` back where `_placement` found it (`Module.to` keeps a parameter object and replaces a buffer)."""
    for name, (device, dtype) in where.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf].data = owner._parameters[leaf].data.to(device=device, dtype=dtype)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = owner._buffers[leaf].to(device=device, dtype=dtype)
    model.train(training)


def run_benchmark(
    variants: list[Variant], settings: BenchSettings, *, log: Callable[[str], None] = print
) -> list[Variant]:
    """Measure every variant at every batch size (alternately), fill `results` and `latency_ms`, return them."""
    device, dtype = parse_device(settings.device), parse_dtype(settings.dtype)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.inference_mode():
        for batch_size in settings.batch_sizes:
            _measure_batch_size(variants, batch_size, settings, device, dtype, generator, log)
        _measure_latency(variants, settings, device, dtype, generator, log)
    for v in variants:
        base = _baseline_of(v, variants)
        for batch_size, result in v.results.items():
            mine = result.get("images_per_s")
            theirs = base.results.get(batch_size, {}).get("images_per_s") if base else None
            result["speedup"] = mine / theirs if mine and theirs else None
    return variants


def _baseline_of(variant: Variant, variants: list[Variant]) -> Variant | None:
    """The variant `variant` is compared with: its baseline model, timed in the same compile mode."""
    return next((b for b in variants if b.name == variant.baseline and b.compile_mode == variant.compile_mode), None)


def _inputs(variants, batch_size, device, dtype, generator) -> dict[tuple, torch.Tensor]:
    shapes = {_input_shape(v) for v in variants}
    return {s: torch.randn(batch_size, *s, generator=generator).to(device=device, dtype=dtype) for s in shapes}


def _fail(v: Variant, batch_size: int, exc: BaseException, device: torch.device, log) -> None:
    if _is_oom(exc):
        v.results[batch_size] = {"status": "oom", "images_per_s": None}
        log(f"{v.label}: out of memory at batch size {batch_size}; going on with the other sizes")
    else:
        text = brief(exc, 200)
        v.results[batch_size] = {"status": f"error: {type(exc).__name__}: {text}", "images_per_s": None}
        log(f"{v.label}: failed at batch size {batch_size} ({type(exc).__name__}: {text}); going on")
    _free(device)


@contextlib.contextmanager
def _outside_inference_mode(enabled: bool) -> Iterator[None]:
    """The first warm-up pass of an eager model runs under no_grad, not inference_mode (nothing is timed there):
    a tensor a model caches process-wide in its first call would otherwise be an inference tensor that no later
    training in the process can use (BEiT's relative position index: bench, then finetune, failed with "Inference
    tensors cannot be saved for backward"). Compiled models are left alone, so that they compile once."""
    if not enabled:
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def _measure_batch_size(variants, batch_size, settings, device, dtype, generator, log) -> None:
    try:
        inputs = _inputs(variants, batch_size, device, dtype, generator)
    except BaseException as exc:  # noqa: BLE001 - the input itself may not fit
        if not _is_oom(exc):
            raise
        for v in variants:
            _fail(v, batch_size, exc, device, log)
        return
    iters: dict[str, int] = {}
    # Warm-up (also compiles), then choose the number of passes per timed block from the last warm-up pass.
    for v in variants:
        x = inputs[_input_shape(v)]
        try:
            for i in range(max(1, settings.warmup)):
                with _outside_inference_mode(i == 0 and v.compile_mode == "eager"):
                    seconds = _time_block(v.runner, x, 1, device)
            iters[v.label] = max(1, math.ceil(settings.min_time / max(seconds, 1e-6)))
        except Exception as exc:  # noqa: BLE001 - OOM or a compile failure: report it, go on
            _fail(v, batch_size, exc, device, log)
    alive = [v for v in variants if v.label in iters]
    samples: dict[str, list[float]] = {v.label: [] for v in alive}
    for repeat in range(max(1, settings.repeats)):
        shift = repeat % max(1, len(alive))
        for v in alive[shift:] + alive[:shift]:  # alternate, rotating the order each repeat
            if v.label not in iters:
                continue
            try:
                seconds = _time_block(v.runner, inputs[_input_shape(v)], iters[v.label], device)
                if seconds <= 0:  # a clock too coarse for the block: no rate can be computed from it
                    raise RuntimeError(f"the clock read {seconds:g} s for {iters[v.label]} forward passes")
            except Exception as exc:  # noqa: BLE001
                _fail(v, batch_size, exc, device, log)
                iters.pop(v.label)
                continue
            samples[v.label].append(batch_size * iters[v.label] / seconds)
    memory: dict[str, float | None] = {}
    for v in alive:
        if v.label not in iters:
            continue
        rates = samples[v.label]
        result = {"status": "ok", "images_per_s": statistics.median(rates), "repeats": rates}
        result["iters_per_repeat"] = iters[v.label]
        if v.compile_mode == "onnxruntime":  # ONNX Runtime's arena outlives a forward: no per-forward peak to read
            memory[v.name] = None
        if v.name not in memory:  # measured once per model, on its eager forward
            try:
                eager = timed_part(v.model, v.config)
                memory[v.name] = _peak_memory_mib(eager, inputs[_input_shape(v)], device)
            except Exception as exc:  # noqa: BLE001
                if not _is_oom(exc):
                    raise
                memory[v.name] = None
                _free(device)
        result["peak_memory_mib"] = memory[v.name]
        v.results[batch_size] = result
        log(f"{v.label}: batch {batch_size}: {rate_text(result['images_per_s'])} images/s")
    del inputs
    _free(device)


def _measure_latency(variants, settings, device, dtype, generator, log) -> None:
    """p50/p90 of single-image forward passes, each timed on its own, models alternating pass by pass."""
    if settings.latency_iters < 1:  # skipped (saves a batch-1 compilation per model)
        return
    inputs = _inputs(variants, 1, device, dtype, generator)
    alive = []
    for v in variants:
        try:
            for _ in range(max(1, settings.warmup)):
                _time_block(v.runner, inputs[_input_shape(v)], 1, device)
            alive.append(v)
        except Exception as exc:  # noqa: BLE001
            v.latency_ms = {"p50": None, "p90": None, "status": f"failed: {type(exc).__name__}"}
            _free(device)
    times: dict[str, list[float]] = {v.label: [] for v in alive}
    for _ in range(max(1, settings.latency_iters)):
        for v in list(alive):
            try:
                times[v.label].append(1000 * _time_block(v.runner, inputs[_input_shape(v)], 1, device))
            except Exception as exc:  # noqa: BLE001 - a pass that fails after the warm-up (out of memory): as above
                v.latency_ms = {"p50": None, "p90": None, "status": f"failed: {type(exc).__name__}"}
                log(f"{v.label}: latency at batch 1 failed ({type(exc).__name__}: {brief(exc, 200)}); going on")
                alive.remove(v)
                _free(device)
    for v in alive:
        v.latency_ms = {"p50": _percentile(times[v.label], 0.5), "p90": _percentile(times[v.label], 0.9)}


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------


def hardware_name(device: str) -> str:
    """A human-readable name of the device measured on, e.g. ``NVIDIA H100 80GB HBM3`` or ``AMD EPYC (2 threads)``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} CPU ({torch.get_num_threads()} threads)"


def environment(settings: BenchSettings) -> dict:
    """Hardware and software the numbers were taken with."""
    from .provenance import versions

    return {
        "hardware": hardware_name(settings.device),
        "device": settings.device,
        "dtype": settings.dtype,
        **versions(data=False),
        "cuda": torch.version.cuda if torch.device(settings.device).type == "cuda" else None,
        "attention": "sdpa",
    }


def to_json(variants: list[Variant], settings: BenchSettings) -> dict:
    """Everything measured, as a JSON-ready dict."""
    rows = []
    for v in variants:
        config = v.config
        base = _baseline_of(v, variants)
        rows.append(
            {
                "model": v.name,
                "compile": v.compile_mode,
                "baseline": v.baseline,
                "merge_after_layer": getattr(config, "merge_after_layer", None),
                "merge_num_tokens": getattr(config, "merge_num_tokens", None),
                "attn_implementation": getattr(config, "_attn_implementation", None),
                "gflops": v.gflops,
                "flops_ratio": v.flops_ratio,
                "results": {str(bs): r for bs, r in v.results.items()},
                "latency_ms_batch1": v.latency_ms,
                "faster_from_batch_size": faster_from(v.results, base and base.results) if v.baseline else None,
                "slower_at_batch_size": slower_at(v.results, base and base.results) if v.baseline else None,
            }
        )
    return {
        "environment": environment(settings),
        "settings": {
            "batch_sizes": list(settings.batch_sizes),
            "compile": list(settings.compile_modes),
            "warmup": settings.warmup,
            "repeats": settings.repeats,
            "min_time_s": settings.min_time,
            "latency_iters": settings.latency_iters,
            "statistic": "median over repeats (models measured alternately)",
        },
        "models": rows,
    }


def faster_from(results: dict[int, dict], source_results: dict[int, dict] | None = None) -> int | None:
    """The crossover: the smallest batch size from which a merged model is at least as fast as its source at every
    batch size where both were measured (None: slower at the largest of those, or nothing compared). A batch size
    where the source did not run (out of memory at the largest) or neither did compares nothing, so it is passed
    over; one where only the merged model failed (`source_results` say the source ran) counts as slower."""
    return _walk_down(results, source_results)[0]


def slower_at(results: dict[int, dict], source_results: dict[int, dict] | None = None) -> int | None:
    """Where `faster_from` found no crossover: the largest batch size that compared the two models, at which the
    merged model was slower than its source or failed where the source ran (None: a crossover, or nothing compared)."""
    crossover, stop = _walk_down(results, source_results)
    return stop if crossover is None else None


def _walk_down(results: dict[int, dict], source_results: dict[int, dict] | None) -> tuple[int | None, int | None]:
    """`faster_from`'s walk from the largest batch size down: (the crossover, the batch size it stopped at)."""
    crossover = None
    for batch_size in sorted(results, reverse=True):
        speedup = results[batch_size].get("speedup")
        if speedup is None:
            source_ran = (source_results or {}).get(batch_size, {}).get("images_per_s")
            if source_ran and not results[batch_size].get("images_per_s"):
                return crossover, batch_size
            continue
        if speedup < 1.0:
            return crossover, batch_size
        crossover = batch_size
    return crossover, None


def _fmt(value: float | None, spec: str = ".1f", default: str = "–") -> str:
    return default if value is None else format(value, spec)


def rate_text(images_per_s: float, decimals: int = 1) -> str:
    """An images/s figure as retrofit prints it: with `decimals` decimals, or two significant digits where those
    would show fewer (a large model on a CPU runs at 0.04 images/s, which one decimal printed as 0.0)."""
    if images_per_s >= 10 ** (1 - decimals):
        return f"{images_per_s:.{decimals}f}"
    return f"{images_per_s:.2g}"


def ratio_text(value: float, threshold: float) -> str:
    """A speed-up or FLOPs ratio printed next to a `threshold` it is compared with (a target, 1.0 for "slower"):
    with two decimals, or more where two would round it onto the other side (1.006 is not "1.01" when the target
    1.01 is missed, nor 0.998 "1.00" when it is called slower)."""
    for decimals in range(2, 7):
        text = f"{value:.{decimals}f}"
        if (float(text) >= threshold) == (value >= threshold):
            return text
    return f"{value:.2f}"


SPREAD_LIMIT = 0.10  # a measurement whose repeats spread wider than this (of the median) is flagged in the table


def spread(result: dict) -> float | None:
    """(max - min) / median of a measurement's repeats, in images/s; None if it has fewer than two."""
    repeats = result.get("repeats") or []
    if len(repeats) < 2 or not result.get("images_per_s"):
        return None
    return (max(repeats) - min(repeats)) / result["images_per_s"]


def fastest_modes(report: dict) -> list[str]:
    """For each merged model measured in more than one compile mode: the mode that serves each batch size fastest
    (highest images/s), as runs of batch sizes, with the speed-up over its source in that same mode, and the batch
    sizes where it is slower than its source even so. The advice the model card gives on how to serve it."""
    lines = []
    merged = [row for row in report["models"] if row["baseline"]]
    for name in dict.fromkeys(row["model"] for row in merged):
        rows = [row for row in merged if row["model"] == name]
        if len(rows) < 2:
            continue
        runs: list[tuple[str, list[tuple[int, float | None]]]] = []  # (mode, [(batch size, speed-up), ...])
        for bs in report["settings"]["batch_sizes"]:
            measured = [(r["results"][str(bs)]["images_per_s"], r["compile"], r["results"][str(bs)].get("speedup"))
                        for r in rows if (r["results"].get(str(bs)) or {}).get("images_per_s")]  # fmt: skip
            if not measured:
                continue
            _, mode, speedup = max(measured, key=lambda m: m[0])
            if runs and runs[-1][0] == mode:
                runs[-1][1].append((bs, speedup))
            else:
                runs.append((mode, [(bs, speedup)]))
        if not runs:
            continue
        parts = []
        for mode, points in runs:
            sizes = f"{points[0][0]}" if len(points) == 1 else f"{points[0][0]}–{points[-1][0]}"
            known = [s for _, s in points if s is not None]
            low, high = (min(known), max(known)) if known else (None, None)
            low, high = (None, None) if low is None else (ratio_text(low, 1.0), ratio_text(high, 1.0))
            gain = "" if low is None else f" ({low}×)" if low == high else f" ({low}–{high}×)"
            parts.append(f"{mode} at batch {sizes}{gain}")
        slower = [
            f"{bs} ({ratio_text(s, 1.0)}×)" for _, points in runs for bs, s in points if s is not None and s < 1.0
        ]
        verdict = (f"slower than its source in that mode at batch {', '.join(slower)}" if slower
                   else "at least as fast as its source in that mode at every batch size measured")  # fmt: skip
        lines.append(f"Fastest way to serve `{name}`: {'; '.join(parts)} (speed-up over the source in the same "
                     f"mode); {verdict}.")  # fmt: skip
    return lines


def largest_measured(report: dict, rows: list[dict], every: bool = False) -> str:
    """The largest batch size of `report` at which one of `rows` (`every`: each of them) was measured, as the JSON
    keys it (the largest asked for where none was): a size where all ran out of memory measured nothing to show."""
    sizes = report["settings"]["batch_sizes"]
    test = all if every else any
    ran = [bs for bs in sizes if test(row["results"].get(str(bs), {}).get("images_per_s") for row in rows)]
    return str(max(ran or sizes))


def markdown_table(report: dict) -> str:
    """The benchmark as a Markdown table (one row per model and compile mode), preceded by the hardware line and
    followed by a note on each measurement whose repeats spread by more than `SPREAD_LIMIT` (flagged ``⚠``): on a
    loaded machine a speed-up can be noise."""
    env, sizes = report["environment"], report["settings"]["batch_sizes"]
    largest = largest_measured(report, report["models"])
    header = ["model", "compile", "GFLOPs", "FLOPs ratio"]
    header += [f"bs={bs} images/s (speed-up)" for bs in sizes]
    header += [f"speed-up ÷ FLOPs ratio (bs={largest})", "latency p50 / p90 ms (bs=1)", f"peak MiB (bs={largest})"]
    lines = [
        f"Hardware: {env['hardware']}, {env['dtype']}, torch {env['torch']}, transformers {env['transformers']}, "
        "SDPA attention",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    flagged = []
    for row in report["models"]:
        cells = [f"`{row['model']}`", row["compile"], _fmt(row["gflops"], ".4g"), _fmt(row["flops_ratio"], ".3f")]
        for bs in sizes:
            result = row["results"].get(str(bs), {})
            status = result.get("status", "–")
            if status != "ok":
                cells.append("OOM" if status == "oom" else status.split(":")[0])
                continue
            speedup = result.get("speedup")
            extra = f" ({ratio_text(speedup, 1.0)}×)" if speedup is not None and row["baseline"] else ""
            wide = spread(result)
            if wide is not None and wide > SPREAD_LIMIT:
                extra += " ⚠"
                mode = "" if row["compile"] == "eager" else f" [compile={row['compile']}]"  # as the log names it
                flagged.append(f"`{row['model']}`{mode} at batch {bs}: repeats spread by {100 * wide:.0f} %")
            cells.append(f"{rate_text(result['images_per_s'])}{extra}")
        last = row["results"].get(largest, {})
        efficiency = None
        if last.get("speedup") and row["flops_ratio"] and row["baseline"]:
            efficiency = last["speedup"] / row["flops_ratio"]
        cells.append(_fmt(efficiency, ".2f"))
        latency = row["latency_ms_batch1"] or {}
        cells.append(f"{_fmt(latency.get('p50'), '.2f')} / {_fmt(latency.get('p90'), '.2f')}")
        peak = last.get("peak_memory_mib")
        cells.append(_fmt(peak, ".0f" if peak is None or peak >= 10 else ".2g"))  # a small model's is not 0 MiB
        lines.append("| " + " | ".join(cells) + " |")
    crossovers = []
    for row in report["models"]:
        compared = any(result.get("speedup") is not None for result in row["results"].values())
        if row["baseline"] and len(sizes) > 1 and compared:
            start, name = row.get("faster_from_batch_size"), f"`{row['model']}` ({row['compile']})"
            crossovers.append(
                f"{name} is at least as fast as its source from batch {start} up"
                if start is not None
                else f"{name} is slower than its source at batch {row.get('slower_at_batch_size') or largest}, the "
                "largest it was compared at"
            )
    if crossovers:
        lines += ["", "; ".join(crossovers) + "."]
    for advice in fastest_modes(report):
        lines += ["", advice]
    if flagged:
        lines += ["", f"⚠ spread over {100 * SPREAD_LIMIT:.0f} % of the median (a loaded machine?): "
                  + "; ".join(flagged) + ". Measure again on an idle machine, or with more --repeats."]  # fmt: skip
    if report["settings"].get("repeats") == 1:  # no spread to flag: a loaded machine's number would pass unseen
        lines += ["", "Each measurement was taken once (--repeats 1), so how much it varies is not known; measure "
                  "with --repeats 3 or more before comparing models."]  # fmt: skip
    return "\n".join(lines)


PLOT_MARK = "retrofit bench"  # the PNG's Software field: how --overwrite knows a plot retrofit drew


def is_our_plot(path: Path, mark: str = PLOT_MARK) -> bool:
    """True if `path` is a PNG that `batch_size_figure` drew (`plot_batch_sizes`, a card's curve): it carries
    `mark` (`PLOT_MARK`; `sweep.plot`'s, for a sweep's plot)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == mark
    except (OSError, ValueError):
        return False


def batch_size_figure(report: dict) -> bytes:
    """Images/s against batch size (log 2 scale) for every model and compile mode of `report`, each merged model's
    crossover (`faster_from`) marked, as PNG bytes marked as retrofit's (`PLOT_MARK`)."""
    import io

    fig, ax = figure(figsize=(7.5, 4.8), dpi=120)
    for row in report["models"]:
        points = sorted((int(bs), r["images_per_s"]) for bs, r in row["results"].items() if r.get("images_per_s"))
        if not points:
            continue
        label = f"{row['model']} ({row['compile']})"
        (line,) = ax.plot(*zip(*points, strict=True), marker="o", label=label)
        start = row.get("faster_from_batch_size")
        if row.get("baseline") and start is not None:
            ax.axvline(start, color=line.get_color(), linestyle=":", linewidth=1)
            ax.annotate(f"faster from {start}", (start, dict(points).get(start, points[0][1])), fontsize=8,
                        color=line.get_color(), xytext=(4, -12), textcoords="offset points")  # fmt: skip
    env = report["environment"]
    ax.set_xscale("log", base=2)
    sizes = sorted({int(bs) for row in report["models"] for bs in row["results"]})
    ax.set_xticks(sizes, [str(bs) for bs in sizes])  # the batch sizes measured, written out (not 2^k)
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.set_title(f"{env['hardware']}, {env['dtype']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": PLOT_MARK})
    return buffer.getvalue()


def figure(**options) -> tuple:
    """A matplotlib figure drawn by Agg and its axes, apart from pyplot: a notebook's backend (``matplotlib.use``
    switched it to Agg for the rest of the session) and its open figures are left alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**options)
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def plot_batch_sizes(report: dict, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `batch_size_figure` to the PNG `path` whole or not at all (an existing file only with `overwrite`, and
    only one this function drew)."""
    import os
    import tempfile

    from .atomic import check_still_ours

    path = Path(path)
    figure = batch_size_figure(report)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(figure)
        check_interrupted()  # a Ctrl-C that a library swallowed: the run stops here, its file unwritten
        if overwrite and path.exists():
            check_still_ours(path, is_our_plot, "draw")  # as before any work: one put there meanwhile is the user's
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # never replaces a file that appeared meanwhile
            except FileExistsError:
                raise RetrofitError(f"'{path}' appeared while this run was working, so it was not replaced") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def merge_option(text: str | None) -> tuple[tuple[str, int], ...]:
    """A ``--merge`` value (``6:8``, ``half:8``, comma-separated) as (K or 'half', M) pairs; else one line."""
    try:
        return parse_merges(text)
    except ValueError as exc:
        raise RetrofitError(f"--merge {exc}") from None


def benchmark(
    models: list[str | os.PathLike] | str | os.PathLike,
    *,
    merges: list[tuple[str, int]] | str | None = None,
    settings: BenchSettings | dict | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Build, measure and report: the Python API behind ``retrofit bench`` and ``bench/speed.py``. Returns the
    JSON-ready report, with its Markdown table under ``"table"`` (as `retrofit.evaluate_models` does). `models`: one
    or a list of shape names, checkpoints, exports or .onnx files (as text or paths); `merges`: ``"6:8,half:8"`` as
    ``--merge`` takes it, or (K or "half", M) pairs; `settings`: a `BenchSettings`, or a dict of its fields."""
    check_arguments("benchmark", log=log)
    models = model_list(models)  # one, or several
    for spec in models:
        if not isinstance(spec, str):
            raise RetrofitError(
                f"benchmark's models are shape names, checkpoints, exports or .onnx files (text or paths), not "
                f"{shown(spec)}"
            )
    if isinstance(settings, dict):  # the fields of BenchSettings, as a notebook writes them
        settings = from_options(BenchSettings, settings, where="benchmark()")
    elif settings is not None and not isinstance(settings, BenchSettings):
        raise RetrofitError(
            f"benchmark's settings must be a BenchSettings or a dict of its fields, not {shown(settings)}"
        )
    settings = settings or BenchSettings()
    if not isinstance(merges, str) and merges is not None:  # pairs: checked as the option's text is
        pairs = list(merges) if isinstance(merges, list | tuple) else None
        if pairs is None or not all(isinstance(pair, list | tuple) and len(pair) == 2 for pair in pairs):
            raise RetrofitError(f'benchmark\'s merges must be text such as "6:8,half:8" or a list of (K, M) pairs, '
                                f"not {shown(merges)}")  # fmt: skip
        merges = ",".join(f"{after}:{tokens}" for after, tokens in pairs) or None
    merges = merge_option(merges)
    variants = build_variants(models, merges, settings, log=log)
    run_benchmark(variants, settings, log=log)
    report = to_json(variants, settings)
    report["table"] = markdown_table(report)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Command line (shared by `retrofit bench` and `bench/speed.py`)
# ----------------------------------------------------------------------------------------------------------------


@releases_write_locks
def run_bench(args: BenchArgs, *, log: Callable[[str], None] = log_to_stderr) -> dict:
    """`retrofit bench`: measure, print the table on stdout (progress on stderr), write --json and --card."""
    from .atomic import check_file_output, refuse_same_outputs, write_report
    from .errors import describe_os_error

    if args.card:
        from .card import check_card_target

        check_card_target(args.card, args.models, curve=len(args.batch_sizes) > 1)
        hold_write_lock(args.card, "--card")  # until the command ends, as evaluate --card holds it
    refuse_same_outputs({"--json": args.json, "--plot": args.plot})
    if args.json is not None:
        check_file_output(args.json, "--json", args.overwrite, inputs=args.models)
    if args.plot is not None:
        check_file_output(args.plot, "--plot", args.overwrite, inputs=args.models, ours=is_our_plot)
    parse_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(**{spec.name: getattr(args, spec.name) for spec in fields(BenchSettings)})
    report = benchmark(args.models, merges=list(args.merge), settings=settings, log=log)
    print(report["table"], flush=True)
    rows = report["models"]
    if not any(r.get("images_per_s") for row in rows for r in row["results"].values()) and not any(
        (row["latency_ms_batch1"] or {}).get("p50") for row in rows
    ):  # every model failed at every batch size: a report, plot or card of n/a cells is not a result
        raise RetrofitError(
            "nothing was measured, so nothing was written: every model failed at every batch size (the lines above "
            "say why: out of memory?); lower --batch-size"
        )
    if args.json is not None:
        try:
            write_report(args.json, report, args.overwrite, kind="bench")
        except OSError as exc:  # a full disk: the table above is complete, the old file (if any) is left as it was
            raise RetrofitError(f"cannot write --json {args.json}: {describe_os_error(exc)}") from None
        log(f"wrote {args.json}")
    if args.plot is not None:
        plot_batch_sizes(report, args.plot, overwrite=args.overwrite)
        log(f"wrote {args.plot}")
    if args.card:
        from .card import update_card

        update_card(args.card, benchmark=report)
        log(f"updated {args.card}/README.md")
    return report
