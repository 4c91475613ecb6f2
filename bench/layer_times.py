#!/usr/bin/env python
"""Where does a merged model spend its time? Per-layer GPU time of a source ViT and its merged twin, side by side.

Each encoder layer (and the merger inside layer K) is timed with CUDA events from forward pre/post hooks over a
batch of random images; the table shows tokens, milliseconds and the merged/source ratio per layer, which tells
whether the layers after the merge run as fast as their FLOPs say or are bound by something else (small GEMMs,
kernel launches, the merger's memory traffic). Needs only torch + transformers. Example::

    python bench/layer_times.py --model vit-b16 --merge 6:8 --batch-size 256 --dtype bf16 --json layers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.benchmark import DTYPES, VIT_SHAPES, shape_model  # noqa: E402
from retrofit.cost import layer_macs, model_cost, num_patches  # noqa: E402
from retrofit.surgery import insert_patch_merger  # noqa: E402


class PatchGemm(torch.nn.Module):
    """The patch-embedding conv (kernel = stride = p, C input channels) computed as one GEMM over unfolded patches.

    Same weights and outputs as the conv; with C = 3 the conv cannot use tensor cores well, the GEMM (K = C·p·p) can.
    """

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.patch = conv.kernel_size[0]
        self.weight = torch.nn.Parameter(conv.weight.detach().flatten(1), requires_grad=False)  # (D, C·p·p)
        self.bias = conv.bias

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        p = self.patch
        patches = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        out = torch.nn.functional.linear(patches, self.weight, self.bias)  # (B, N, D)
        return out.transpose(1, 2).reshape(b, -1, h // p, w // p)  # the conv's (B, D, H/p, W/p) layout


class ChannelsLastConv(torch.nn.Module):
    """The patch-embedding conv run on channels-last (NHWC) input and weights, which cuDNN may serve faster."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv.to(memory_format=torch.channels_last)

    @property
    def weight(self) -> torch.Tensor:  # transformers reads the projection's dtype from it
        return self.conv.weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.conv(pixels.contiguous(memory_format=torch.channels_last))


PATCH_EMBEDS = {"conv": None, "channels-last": ChannelsLastConv, "gemm": PatchGemm}


def use_patch_embed(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """Compute `model`'s patch embedding the `kind` way (same weights)."""
    if PATCH_EMBEDS[kind] is not None:
        embeddings = model.vit.embeddings.patch_embeddings
        embeddings.projection = PATCH_EMBEDS[kind](embeddings.projection)
    return model


SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def pin_sdpa_backend(layers: list[torch.nn.Module], backend: str) -> None:
    """Make `layers` run their scaled-dot-product attention on one backend (e.g. the math path for 9-token inputs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, SDPA_BACKENDS[backend])
    for layer in layers:

        def forward(*args, _forward=layer.forward, **kwargs):
            with sdpa_kernel([chosen]):
                return _forward(*args, **kwargs)

        layer.forward = forward


class Clock:
    """Timestamps on the device's own clock: CUDA events on a GPU, `time.perf_counter` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000


def time_modules(model, modules: dict[str, torch.nn.Module], pixels: torch.Tensor, repeats: int, clock: Clock):
    """Median milliseconds per named module over `repeats` forward passes (timestamps from forward hooks)."""
    marks: dict[str, list] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():

        def pre(_module, _args, name=name):
            marks[name].append([clock.mark(), None])

        def post(_module, _args, _output, name=name):
            marks[name][-1][1] = clock.mark()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    with torch.inference_mode():
        for _ in range(3):
            model(pixel_values=pixels)
        clock.sync()
        for times in marks.values():
            times.clear()
        totals = []
        for _ in range(repeats):
            start = clock.mark()
            model(pixel_values=pixels)
            end = clock.mark()
            clock.sync()
            totals.append(clock.ms(start, end))
    for handle in handles:
        handle.remove()
    result = {name: statistics.median(clock.ms(s, e) for s, e in times) for name, times in marks.items()}
    result["total"] = statistics.median(totals)
    return result


def time_forwards(models: dict[str, torch.nn.Module], pixels: torch.Tensor, repeats: int, clock: Clock):
    """Median milliseconds of a whole forward pass per model, no hooks, the models alternating pass by pass."""
    totals: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(3):
            for model in models.values():
                model(pixel_values=pixels)
        clock.sync()
        for _ in range(repeats):
            for name, model in models.items():
                start = clock.mark()
                model(pixel_values=pixels)
                end = clock.mark()
                clock.sync()
                totals[name].append(clock.ms(start, end))
    return {name: statistics.median(times) for name, times in totals.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16", choices=VIT_SHAPES)
    parser.add_argument("--merge", default="6:8", help="K:M")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (slow; for trying the script out)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the table to this file")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN pick the fastest conv algorithm")
    parser.add_argument(
        "--patch-embed",
        default="conv",
        choices=sorted(PATCH_EMBEDS),
        help="how the patch embedding is computed: the model's conv, the conv on channels-last tensors, or one GEMM "
        "over unfolded patches (same weights)",
    )
    parser.add_argument("--patch-gemm", action="store_true", help="the same as --patch-embed gemm")
    parser.add_argument(
        "--merged-only",
        action="store_true",
        help="change the patch embedding of the merged model only (the source keeps its conv)",
    )
    parser.add_argument(
        "--merged-sdpa",
        choices=sorted(SDPA_BACKENDS),
        help="the attention backend of the merged model's layers after the merge (default: torch's choice)",
    )
    args = parser.parse_args()
    if args.patch_gemm:
        args.patch_embed = "gemm"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("layer_times.py: error: --device cuda needs a CUDA GPU (try --device cpu)", file=sys.stderr)
        return 2
    dtype, clock = DTYPES[args.dtype], Clock(device)
    after, tokens = (int(v) for v in args.merge.split(":"))
    source = shape_model(args.model, device, dtype)
    merged = insert_patch_merger(shape_model(args.model, device, dtype), after, tokens).to(device, dtype).eval()
    pixels = torch.randn(args.batch_size, 3, 224, 224, device=device, dtype=dtype)
    if args.merged_sdpa:
        pin_sdpa_backend(list(merged.vit.layers)[after:], args.merged_sdpa)
    if args.patch_embed != "conv":
        with torch.inference_mode():
            reference = merged(pixel_values=pixels[:4]).logits
        if not args.merged_only:
            use_patch_embed(source, args.patch_embed)
        use_patch_embed(merged, args.patch_embed)
        with torch.inference_mode():
            diff = (merged(pixel_values=pixels[:4]).logits - reference).abs().max().item()
        print(f"patch embedding as {args.patch_embed}: max |logit difference| vs the conv = {diff:.3g} ({args.dtype})")

    def named(model):
        layers = model.vit.layers
        parts = {"embeddings": model.vit.embeddings, **{f"layer {i}": layer for i, layer in enumerate(layers)}}
        if getattr(model.config, "merge_after_layer", None) is not None:
            parts["merger"] = model.patch_merger
        return parts

    src, mrg = (
        time_modules(source, named(source), pixels, args.repeats, clock),
        time_modules(merged, named(merged), pixels, args.repeats, clock),
    )
    plain = time_forwards({"source": source, "merged": merged}, pixels, args.repeats, clock)
    config = source.config
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    patch = f"{args.patch_embed}{' (merged model only)' if args.merged_only else ''}"
    print(
        f"{args.model}, merge {args.merge}, batch {args.batch_size}, {args.dtype}, {hardware}, "
        f"cudnn.benchmark={args.cudnn_benchmark}, patch embedding: {patch}, "
        f"attention after the merge: {args.merged_sdpa or 'torch default'}"
    )
    print("| part | tokens source → merged | ms source | ms merged | time ratio | MACs ratio |")
    print("|---|---|---|---|---|---|")
    rows = []
    for i in range(config.num_hidden_layers):
        n_src = num_patches(config) + 1
        n_mrg = n_src if i < after else tokens + 1
        macs = layer_macs(n_mrg, config.hidden_size, config.intermediate_size) / layer_macs(
            n_src, config.hidden_size, config.intermediate_size
        )
        key = f"layer {i}"
        note = " (incl. merger)" if i == after else ""
        rows.append({"part": key, "tokens": [n_src, n_mrg], "ms_source": src[key], "ms_merged": mrg[key]})
        print(
            f"| {key}{note} | {n_src} → {n_mrg} | {src[key]:.3f} | {mrg[key]:.3f} | {mrg[key] / src[key]:.3f} "
            f"| {macs:.3f} |"
        )
    print(f"| merger alone | | | {mrg['merger']:.3f} | | |")
    print(f"| embeddings | | {src['embeddings']:.3f} | {mrg['embeddings']:.3f} | | |")
    print(f"| whole forward | | {src['total']:.3f} | {mrg['total']:.3f} | {mrg['total'] / src['total']:.3f} | |")
    first = sum(src[f"layer {i}"] for i in range(after))
    rest_src = sum(src[f"layer {i}"] for i in range(after, config.num_hidden_layers))
    rest_mrg = sum(mrg[f"layer {i}"] for i in range(after, config.num_hidden_layers))
    other = src["total"] - first - rest_src - src["embeddings"]
    print(
        f"\nfirst {after} layers {first:.2f} ms; layers {after}.. {rest_src:.2f} → {rest_mrg:.2f} ms "
        f"(merger {mrg['merger']:.2f} ms); outside the layers {other:.2f} ms"
    )
    flops_ratio = model_cost(source.config).gflops / model_cost(merged.config).gflops
    speedup = plain["source"] / plain["merged"]
    print(
        f"whole forward without hooks: {plain['source']:.2f} → {plain['merged']:.2f} ms, speed-up {speedup:.2f}x, "
        f"FLOPs ratio {flops_ratio:.3f}x, speed-up ÷ FLOPs ratio {speedup / flops_ratio:.2f}"
    )
    if args.json:
        report = {
            "settings": {**vars(args), "hardware": hardware},
            "rows": rows,
            "source": src,
            "merged": mrg,
            "without_hooks": {**plain, "speedup": speedup, "flops_ratio": flops_ratio},
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
