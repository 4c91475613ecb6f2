#!/usr/bin/env python
"""Speed benchmark of source vs merged ViTs: prints a Markdown table, optionally writes JSON.

Needs only torch + transformers (+ accelerate): no datasets, evaluate or matplotlib. Examples::

    python bench/speed.py --models vit-b16 --merge 6:8 --device cpu --dtype fp32 --batch-size 1,8
    python bench/speed.py --models vit-b16,vit-l16,vit-h14 --merge half:8 --device cuda --dtype bf16 \\
        --batch-size 256 --compile both --json speed.json

Models are shape names (vit-ti16, vit-s16, vit-b16, vit-l16, vit-h14: random weights, 224x224, 1000 classes),
checkpoint folders, Hub ids or retrofit exports. `--merge K:M` adds a merged twin of each unmerged model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrofit.benchmark import run_bench  # noqa: E402
from retrofit.errors import RetrofitError  # noqa: E402
from retrofit.settings import BenchArgs, add_options, from_namespace  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--models" in argv:  # --models a,b is the models a b
        index = argv.index("--models")
        argv[index : index + 2] = argv[index + 1].split(",") if index + 1 < len(argv) else []
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, BenchArgs)
    namespace = parser.parse_args(argv)
    try:
        run_bench(from_namespace(BenchArgs, namespace))
    except RetrofitError as exc:
        print(f"speed.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
