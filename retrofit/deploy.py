"""`retrofit export-onnx`: an ONNX graph of a model (a retrofit export, or its source) that takes any batch size,
checked against PyTorch before it is kept; and `OnnxModel`, how `retrofit bench` runs such a file in ONNX Runtime.

The exporter is chosen per family: torch's ``dynamo=True`` exporter, or for the families whose code it cannot take
(a relative position bias: BEiT, Data2Vec-vision) the TorchScript one. The graph's outputs are what users read:
``logits`` for a classifier, ``last_hidden_state`` (and ``pooler_output`` where there is one) for a backbone,
``image_embeds`` for a dual encoder (its image tower). The file's metadata says what it was made from (`MODEL_KEY`),
so ``--overwrite`` replaces only a file retrofit wrote and ``bench`` knows its FLOPs and its source.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RetrofitError, brief, check_arguments, check_interrupted, interrupts_deferred, log_to_stderr
from .settings import ONNX_TOLERANCE, ExportOnnxArgs, from_options

MODEL_KEY = "retrofit"  # metadata_props key of the JSON that says what a file is (`onnx_info`)


@dataclass
class OnnxResult:
    """What `export_onnx` wrote and how close ONNX Runtime's outputs came to PyTorch's."""

    output: Path
    max_difference: float
    tolerance: float
    images: int
    exporter: str


def export_onnx(model: str | Path, output: str | Path, *, log: Callable[[str], None] = print, **settings) -> OnnxResult:
    """Export `model` (a retrofit export, or a checkpoint retrofit converts) to the ONNX file `output` (with the
    dynamo exporter, its weights beside it in ``<output>.data``, to be kept with it); `settings` are
    `retrofit.settings.ExportOnnxArgs` fields (dtype, overwrite, images, tolerance)."""
    args = from_options(ExportOnnxArgs, {"model": model, "output": output, **settings}, where="export_onnx()")
    check_arguments("export_onnx", log=log)
    return run_export_onnx(args, log=log)


def run_export_onnx(args: ExportOnnxArgs, *, log: Callable[[str], None] = log_to_stderr) -> OnnxResult:
    """`export_onnx` for settings already checked (``retrofit export-onnx`` builds `ExportOnnxArgs` itself)."""
    from .atomic import check_file_output
    from .loading import check_runs_on_its_images, family_and_head, load_config, load_image_processor, load_model

    _need_onnx()
    output = Path(args.output)
    if output.is_dir() and not output.is_symlink():  # `check_file_output` would suggest a JSON file in it
        raise RetrofitError(f"--output '{output}' is a folder; give a file name, e.g. {output / 'model.onnx'}")
    if output.suffix != ".onnx":
        example = output.with_suffix(".onnx") if output.name else "model.onnx"
        raise RetrofitError(f"--output '{output}' must be a file name ending in .onnx, e.g. {example}")
    check_file_output(output, "--output", args.overwrite, inputs=(args.model,), ours=written_by_retrofit)
    _check_weights_file(output)
    config = load_config(args.model)
    family, head = family_and_head(config)
    if family.padded_patches:
        raise RetrofitError(
            f"retrofit export-onnx does not export {family.user_name} models: their vision tower takes each image as "
            "a padded sequence of patches with a mask and its shape (NaFlex), which the graph would have to take as "
            "inputs; serve the PyTorch export"
        )
    processor = load_image_processor(args.model, config, log=log)
    model = load_model(args.model, config=config).eval()
    check_runs_on_its_images(model, processor, args.model)
    pixels = _sample_images(processor, config, args.images)
    # The reference is the model in float32 whatever its weights' dtype (exact for bf16/fp16 weights): a bf16 export
    # run in bf16 differs from its own fp32 graph by bf16's rounding (~1e-3), far above the fp32 tolerance.
    model = model.float()
    with torch.no_grad():
        expected = _outputs(model, pixels)
    exported = model.half() if args.dtype == "fp16" else model
    exporter = "torchscript" if family.relative_position_bias else "dynamo"
    tolerance = args.tolerance if args.tolerance is not None else ONNX_TOLERANCE[args.dtype]
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.tmp-", dir=output.parent) as work:
        path = Path(work) / output.name
        with interrupts_deferred("the ONNX export", log):  # interrupted mid-trace, torch aborted in C++
            names = _export(exported, pixels, path, exporter)
        _write_metadata(path, _info(args, config, head, processor))
        got = _run(path, pixels)
        difference = max(_relative_difference(got[name], expected[name]) for name in names)
        log(f"ONNX Runtime against PyTorch on {len(pixels)} images: max |difference| {difference:.2e} of the outputs' "
            f"scale (tolerance {tolerance:g}); exporter: {exporter}, {args.dtype}")  # fmt: skip
        if not difference <= tolerance:
            fp32 = "--dtype fp32, " if args.dtype != "fp32" else ""
            raise RetrofitError(
                f"the ONNX graph's outputs differ from PyTorch's by {difference:.3g} (more than {tolerance:g}); it was "
                f"not written. Try {fp32}a --tolerance above {difference:.3g} if that is close enough, or report the "
                "model"
            )
        check_interrupted()  # a Ctrl-C that a library (the exporter) swallowed: the run stops here, its file unwritten
        with interrupts_deferred("the new graph is in place", log):  # a Ctrl-C mid-swap left an .old- file behind
            _move_into_place(Path(work), output, args.overwrite)
    log(f"wrote {output}")
    return OnnxResult(output, difference, tolerance, len(pixels), exporter)


def _need_onnx() -> None:
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise RetrofitError(f"ONNX export needs {', '.join(missing)}: pip install 'retrofit[onnx]'")


def _sample_images(processor, config, count: int) -> torch.Tensor:
    """`count` images of noise (seeded), larger than the model's input, prepared by the model's own processor."""
    import numpy as np
    from PIL import Image

    from .loading import image_channels, processor_image_size

    height, width = processor_image_size(processor) or (224, 224)
    channels = image_channels(config)
    rng = np.random.default_rng(0)
    mode = "L" if channels == 1 else "RGB"
    shape = (height + 13, width + 7) if channels == 1 else (height + 13, width + 7, 3)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode) for _ in range(count)]
    return torch.as_tensor(np.stack(processor(images)["pixel_values"])).float()


class _Outputs(torch.nn.Module):
    """The model with the outputs users read, as a tuple: what the ONNX graph returns, by name (`named`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from .loading import family_and_head

        super().__init__()
        self.model = model
        self.dual = family_and_head(model.config)[1].is_dual_encoder

    def named(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits, or a backbone's hidden states and pooler output, or a dual encoder's image embeddings (its image
        tower: the text embeddings of a fixed set of prompts are computed once, outside the graph)."""
        if self.dual:
            from .zero_shot import image_embeddings

            return {"image_embeds": image_embeddings(self.model, pixel_values)}
        out = self.model(pixel_values=pixel_values)
        if out.get("logits") is not None:
            return {"logits": out["logits"]}
        return {name: out[name] for name in ("last_hidden_state", "pooler_output") if out.get(name) is not None}

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.named(pixel_values).values())


def _outputs(model: torch.nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: value.float() for name, value in _Outputs(model).named(pixels).items()}


def _export(model: torch.nn.Module, pixels: torch.Tensor, path: Path, exporter: str) -> list[str]:
    """Write `model` to `path` with a dynamic batch (traced at batch 2); returns the output names."""
    import warnings

    dtype = next(model.parameters()).dtype
    example = pixels[:2].to(dtype)
    with torch.no_grad():
        names = list(_Outputs(model).named(example))
    batch = (
        {"dynamic_shapes": {"pixel_values": {0: torch.export.Dim("batch")}}}
        if exporter == "dynamo"
        else {"dynamic_axes": {"pixel_values": {0: "batch"}, **{name: {0: "batch"} for name in names}}}
    )
    # Known noise of the exporters, not the user's business: TorchScript's deprecation and tracer notes, torch's
    # internal FutureWarnings, and the dynamo exporter's log lines about torchvision ops it skips.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    try:
        registration.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
                warnings.simplefilter("ignore", category=category)
            torch.onnx.export(_Outputs(model).eval(), (example,), path, dynamo=exporter == "dynamo", verbose=False,
                              input_names=["pixel_values"], output_names=names, **batch)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the exporters raise many kinds: one line, -v shows the rest
        raise RetrofitError(f"torch.onnx.export ({exporter}) failed: {brief(exc, 200)}") from exc
    finally:
        registration.setLevel(level)
    return names


def _info(args: ExportOnnxArgs, config, head, processor) -> dict:
    """What the file says about itself (`onnx_info`): enough for `bench` and `--overwrite`, nothing private. Its
    GFLOPs are at the size the graph runs at, the processor's (a DINOv2 config says 518, its processor crops 224)."""
    from .cost import model_cost
    from .loading import is_merged, processor_image_size
    from .provenance import public_name, source_record

    merged = is_merged(config)
    return {
        "model": public_name(args.model),
        "class": head.class_name,
        "dtype": args.dtype,
        "gflops": model_cost(config, processor_image_size(processor)).gflops,
        "merge_after_layer": getattr(config, "merge_after_layer", None) if merged else None,
        "merge_num_tokens": getattr(config, "merge_num_tokens", None) if merged else None,
        "merge_source_sha256": getattr(config, "merge_source_sha256", None) if merged else None,
        "weights_sha256": source_record(args.model).sha256,
    }


def _graph_sha256(model) -> str:
    """The sha256 of an ONNX model's graph (its nodes and initializers; weights kept in ``<file>.data`` are named,
    not read): a graph quantised, optimised or converted after retrofit wrote it keeps the metadata, not this."""
    import hashlib

    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def _data_sha256(path: Path, model) -> str | None:
    """The sha256 of the weights file the ONNX `model` at `path` names as its external data (None where it names
    none, or the file is missing): a file changed in place (quantised weights) leaves the graph as it was, not this."""
    import hashlib

    names = {entry.value for t in model.graph.initializer for entry in t.external_data if entry.key == "location"}
    data = path.with_name(f"{path.name}.data")
    if data.name not in names or not data.is_file():
        return None
    digest = hashlib.sha256()
    with open(data, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_metadata(path: Path, info: dict) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = model.metadata_props.add()
    digests = {"graph_sha256": _graph_sha256(model), "data_sha256": _data_sha256(path, model)}
    entry.key, entry.value = MODEL_KEY, json.dumps({**info, **digests})
    onnx.save(model, str(path))


def _data_changed(path: Path) -> bool:
    """Whether the weights file beside the retrofit graph at `path` was changed since retrofit wrote it (read whole:
    checked only where retrofit is about to replace or time it)."""
    import onnx

    info, _ = _read_info(path)
    recorded = (info or {}).get("data_sha256")  # (none: no weights file, or written before this was recorded)
    if recorded is None:
        return False
    now = _data_sha256(path, onnx.load(str(path), load_external_data=False))
    return now is not None and now != recorded  # (a missing file is not a changed one: loading it says so)


def _read_info(path: str | Path) -> tuple[dict | None, bool]:
    """(the metadata retrofit wrote into an ONNX file or None, whether its graph was changed since)."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        entry = next((prop for prop in model.metadata_props if prop.key == MODEL_KEY), None)
        info = json.loads(entry.value) if entry is not None else None
    except Exception:  # noqa: BLE001 - not ONNX, unreadable, onnx not installed: not ours
        return None, False
    if not isinstance(info, dict):
        return None, False
    recorded = info.get("graph_sha256")  # (none in a file written before retrofit recorded it: taken as written)
    return info, recorded is not None and recorded != _graph_sha256(model)


def onnx_info(path: str | Path) -> dict | None:
    """The metadata retrofit wrote into an ONNX file, or None (not an ONNX file retrofit wrote, or one whose graph
    was changed since: a quantised copy keeps the metadata, yet is the user's file and not the graph it describes)."""
    info, changed = _read_info(path)
    return None if changed else info


def check_onnx_file(path: str | Path) -> dict:
    """Refuse, in one line, a path that is not an ONNX file retrofit wrote; returns its metadata."""
    _need_onnx()
    if Path(path).is_dir():
        raise RetrofitError(f"'{path}' is a folder, not an ONNX file; give the .onnx file `retrofit export-onnx` wrote")
    if not Path(path).is_file():
        raise RetrofitError(f"'{path}' does not exist; make it with `retrofit export-onnx EXPORT --output {path}`")
    info, changed = _read_info(path)
    if info is not None and not changed and _data_changed(Path(path)):
        raise RetrofitError(
            f"'{path}.data', the weights of '{path}', was changed after retrofit wrote it (quantised, cut short?), so "
            "what the graph's metadata says of it (dtype, FLOPs, source) no longer holds; time the files export-onnx "
            "wrote, or write new ones with `retrofit export-onnx` to another --output (these are kept as yours)"
        )
    if changed:
        raise RetrofitError(
            f"'{path}' was changed after retrofit wrote it (its graph is not the one `retrofit export-onnx` wrote: "
            "quantised or optimised?), so what its metadata says of it (dtype, FLOPs, source) no longer holds; time "
            "the file export-onnx wrote"
        )
    if info is None:
        raise RetrofitError(f"'{path}' is not an ONNX file retrofit wrote; make one with `retrofit export-onnx`")
    return info


def written_by_retrofit(path: Path) -> bool:
    return onnx_info(path) is not None


def _check_weights_file(output: Path) -> None:
    """Refuse, before any work, a ``<output>.data`` (where the exporter writes the graph's weights) that exists and
    is not the weights of the graph retrofit wrote at `output` (a regular file that graph names as its external
    data): ``--overwrite`` replaces only retrofit's own files."""
    data = _weights_file(output)
    if not (data.exists() or data.is_symlink()) or _own_weights_file(output):
        return
    if _names_its_weights_file(output):  # named by retrofit's graph, yet not its own: changed in place
        raise RetrofitError(
            f"--output '{output}': its weights file '{data}' was changed after retrofit wrote it (quantised?), so it"
            " is the user's now and --overwrite does not replace it; move it out or choose another --output"
        )
    raise RetrofitError(
        f"--output '{output}': '{data}' exists and is not the weights file of an ONNX graph retrofit wrote there "
        "(the export writes its weights to that name), so it is not replaced; move it out or choose another --output"
    )


def _weights_file(output: Path) -> Path:
    return output.with_name(f"{output.name}.data")


def _names_its_weights_file(output: Path) -> bool:
    """Whether ``<output>.data`` is a regular file that the retrofit graph at `output` names as its external data."""
    data = _weights_file(output)
    if not data.is_file() or data.is_symlink() or not written_by_retrofit(output):
        return False
    import onnx

    tensors = onnx.load(str(output), load_external_data=False).graph.initializer
    return any(entry.key == "location" and entry.value == data.name for t in tensors for entry in t.external_data)


def _own_weights_file(output: Path) -> bool:
    """Whether ``<output>.data`` is the weights file of the retrofit graph at `output`, as retrofit wrote it (changed
    in place since, it is the user's)."""
    return _names_its_weights_file(output) and not _data_changed(output)


def _session(path: Path, device: str = "cpu"):
    """An ONNX Runtime session on `device`, with as many CPU threads as torch uses (``bench --threads``), so that both
    runtimes are measured alike."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise RetrofitError(
                "this ONNX Runtime has no CUDA provider; pip install onnxruntime-gpu, or measure with --device cpu"
            )
        providers.insert(0, "CUDAExecutionProvider")
    return onnxruntime.InferenceSession(str(path), options, providers=providers)


def _run(path: Path, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    session = _session(path)
    feed = pixels.numpy().astype(_input_dtype(session))
    names = [output.name for output in session.get_outputs()]
    values = session.run(None, {"pixel_values": feed})
    return {name: torch.from_numpy(value).float() for name, value in zip(names, values, strict=True)}


def _input_dtype(session) -> str:
    return "float16" if session.get_inputs()[0].type == "tensor(float16)" else "float32"


def _relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected|, relative to the scale of `expected` (its largest magnitude, at least 1)."""
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1.0))


def _move_into_place(work: Path, output: Path, overwrite: bool) -> None:
    """The file(s) the exporter wrote in `work` (the graph, and ``<output>.data``, its weights, where the exporter
    keeps them beside it) into `output`'s folder; an `output` that appeared meanwhile is not replaced without
    `overwrite` (`_check_weights_file` checked the weights file before any work). The weights file of the graph
    replaced goes with it when the new graph keeps its weights inside (the TorchScript exporter's small graphs)."""
    from .atomic import check_still_ours

    if overwrite:  # checked again, as before any work: a file put there meanwhile is the user's
        check_still_ours(output, written_by_retrofit)
        _check_weights_file(output)
    stale = _weights_file(output)
    stale = stale if overwrite and not (work / stale.name).exists() and _own_weights_file(output) else None
    set_aside: list[tuple[Path, Path]] = []  # (a replaced weights file, its old version) until the graph is in place
    try:
        for path in sorted(work.iterdir(), key=lambda p: p.name == output.name):  # the graph last: whole or absent
            target = output.parent / path.name
            if target.exists() and not overwrite:
                raise RetrofitError(f"'{target}' appeared while this run was working; it was not replaced")
            if path.name != output.name and target.exists():
                set_aside.append((target, target.with_name(f".{target.name}.old-{os.getpid()}")))
                os.replace(target, set_aside[-1][1])
            os.replace(path, target)
    except BaseException:  # stopped before the new graph was in place: the old graph keeps its own weights
        for target, old in set_aside:
            os.replace(old, target)
        raise
    for _, old in set_aside:
        old.unlink(missing_ok=True)
    if stale is not None:
        stale.unlink(missing_ok=True)


class OnnxModel:
    """An ONNX file retrofit wrote, run in ONNX Runtime, called as a model is (``model(pixel_values=x)[0]``) by
    `retrofit.benchmark`. Its `config` carries what the file's metadata says (merge settings, FLOPs)."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, NoSuchFile

        self.path, self.info = Path(path), check_onnx_file(path)
        try:
            self.session = _session(self.path, device)
        except (Fail, InvalidArgument, InvalidGraph, NoSuchFile) as exc:  # its weights file missing or cut short, ...
            raise RetrofitError(
                f"ONNX Runtime cannot load '{path}' ({brief(exc, 160)}); its weights file {self.path.name}.data may be "
                f"missing or cut short: write it again with `retrofit export-onnx MODEL --output {path} --overwrite`"
            ) from None
        self.dtype = _input_dtype(self.session)
        self.input_shape = tuple(self.session.get_inputs()[0].shape[1:])
        self.config = type("OnnxConfig", (), {"_attn_implementation": "onnxruntime", **self.info})()

    def __call__(self, pixel_values: torch.Tensor) -> tuple:
        feed = pixel_values.detach().cpu().numpy().astype(self.dtype)
        return tuple(torch.from_numpy(value) for value in self.session.run(None, {"pixel_values": feed}))
