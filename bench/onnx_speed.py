#!/usr/bin/env python
"""Does the speed-up survive deployment? A source ViT and its merged twin, each exported with `retrofit export-onnx`
and measured with `retrofit bench` beside their PyTorch forms, in one table.

The models are a named shape with random weights (224x224, 1000 classes: speed does not depend on the weights), saved
to a temporary folder as a checkpoint and as a retrofit export, so that no download is needed. Needs
``pip install -e ".[onnx]"``. Example::

    python bench/onnx_speed.py --model vit-b16 --merge 6:8 --batch-size 1,8 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.benchmark import VIT_SHAPES, benchmark, checked_merge, merge_option, shape_model  # noqa: E402
from retrofit.deploy import export_onnx  # noqa: E402
from retrofit.errors import RetrofitError  # noqa: E402
from retrofit.export import export  # noqa: E402
from retrofit.settings import BenchSettings, comma_ints  # noqa: E402
from retrofit.surgery import insert_patch_merger  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b16", choices=VIT_SHAPES, help="ViT shape (random weights)")
    parser.add_argument("--merge", default="half:8", help="K:M, where to merge and into how many tokens")
    parser.add_argument("--batch-size", default="8", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per model and batch size")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        (after, tokens), *_ = merge_option(args.merge)
        settings = BenchSettings(batch_sizes=comma_ints(args.batch_size), repeats=args.repeats, latency_iters=0)
        with tempfile.TemporaryDirectory() as folder:
            from transformers import ViTImageProcessor
            from transformers.utils.logging import disable_progress_bar

            disable_progress_bar()
            work = Path(folder)
            source = shape_model(args.model, torch.device("cpu"), torch.float32)
            k = checked_merge(source.config, after, tokens)
            processor = ViTImageProcessor(size={"height": 224, "width": 224})
            source.save_pretrained(work / "source")
            processor.save_pretrained(work / "source")
            merged = insert_patch_merger(source, k, tokens, source=str(work / "source")).eval()
            export(merged, work / "merged", image_processor=processor)
            for name in ("source", "merged"):
                export_onnx(work / name, work / f"{name}.onnx", log=lambda _: None)
            models = [str(work / name) for name in ("source", "merged", "source.onnx", "merged.onnx")]
            report = benchmark(models, settings=settings, log=lambda text: print(text, file=sys.stderr))
    except (RetrofitError, ValueError) as exc:
        print(f"onnx_speed.py: error: {exc}", file=sys.stderr)
        return 2
    named = f"{args.model}/"  # the temporary folder is gone: name the models by their shape
    print(report["table"].replace(str(work) + "/", named))
    if args.json:
        text = json.dumps({"model": args.model, "merge": args.merge, **report}, indent=2) + "\n"
        Path(args.json).write_text(text.replace(str(work) + "/", named))
    return 0


if __name__ == "__main__":
    sys.exit(main())
