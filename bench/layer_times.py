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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.benchmark import DTYPES, shape_model  # noqa: E402
from retrofit.cost import layer_macs, num_patches  # noqa: E402
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


def use_patch_gemm(model: torch.nn.Module) -> torch.nn.Module:
    embeddings = model.vit.embeddings.patch_embeddings
    embeddings.projection = PatchGemm(embeddings.projection)
    return model


def time_modules(model: torch.nn.Module, modules: dict[str, torch.nn.Module], pixels: torch.Tensor, repeats: int):
    """Median milliseconds per named module over `repeats` forward passes (CUDA events around each call)."""
    events: dict[str, list] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():

        def pre(_module, _args, name=name):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            events[name].append([start, None])

        def post(_module, _args, _output, name=name):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            events[name][-1][1] = end

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    with torch.inference_mode():
        for _ in range(3):
            model(pixel_values=pixels)
        torch.cuda.synchronize()
        for times in events.values():
            times.clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        totals = []
        for _ in range(repeats):
            start.record()
            model(pixel_values=pixels)
            end.record()
            torch.cuda.synchronize()
            totals.append(start.elapsed_time(end))
    for handle in handles:
        handle.remove()
    result = {name: statistics.median(s.elapsed_time(e) for s, e in times) for name, times in events.items()}
    result["total"] = statistics.median(totals)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16")
    parser.add_argument("--merge", default="6:8", help="K:M")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the table to this file")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN pick the fastest conv algorithm")
    parser.add_argument("--patch-gemm", action="store_true", help="compute the patch embedding as a GEMM (both models)")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if not torch.cuda.is_available():
        print("layer_times.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), DTYPES[args.dtype]
    after, tokens = (int(v) for v in args.merge.split(":"))
    source = shape_model(args.model, device, dtype)
    merged = insert_patch_merger(shape_model(args.model, device, dtype), after, tokens).to(device, dtype).eval()
    pixels = torch.randn(args.batch_size, 3, 224, 224, device=device, dtype=dtype)
    if args.patch_gemm:
        with torch.inference_mode():
            reference = source(pixel_values=pixels[:4]).logits
        use_patch_gemm(source), use_patch_gemm(merged)
        with torch.inference_mode():
            diff = (source(pixel_values=pixels[:4]).logits - reference).abs().max().item()
        print(f"patch embedding as GEMM: max |logit difference| vs the conv = {diff:.3g} ({args.dtype})")

    def named(model):
        layers = model.vit.layers
        parts = {"embeddings": model.vit.embeddings, **{f"layer {i}": layer for i, layer in enumerate(layers)}}
        if getattr(model.config, "merge_after_layer", None) is not None:
            parts["merger"] = model.patch_merger
        return parts

    src, mrg = (
        time_modules(source, named(source), pixels, args.repeats),
        time_modules(merged, named(merged), pixels, args.repeats),
    )
    config = source.config
    print(
        f"{args.model}, merge {args.merge}, batch {args.batch_size}, {args.dtype}, {torch.cuda.get_device_name()}, "
        f"cudnn.benchmark={args.cudnn_benchmark}, patch embedding as GEMM={args.patch_gemm}"
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
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "source": src, "merged": mrg}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
