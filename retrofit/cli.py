"""The `retrofit` command line: a thin layer over the Python API (one sub-command per API function)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from . import __version__
from .errors import RetrofitError

Handler = Callable[[argparse.Namespace], int | None]


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of SOURCE")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow SOURCE's own modeling code to run (off by default)"
    )


def _add_merge_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--after-layer",
        type=int,
        required=required,
        metavar="K",
        help="number of encoder layers that still run on all tokens (1 <= K < number of layers)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        required=required,
        metavar="M",
        help="number of merged tokens (prefix tokens such as CLS come on top)",
    )


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    convert(
        args.source,
        after_layer=args.after_layer,
        num_tokens=args.tokens,
        output=args.output,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
        calibrate_on=args.calibrate_on,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrofit", description="Make pretrained Vision Transformers faster with a PatchMerger."
    )
    parser.add_argument("--version", action="version", version=f"retrofit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", help="insert a PatchMerger into a checkpoint and export it")
    convert.add_argument("source", help="Hub model id or local folder")
    _add_merge_options(convert)
    convert.add_argument("--output", "-o", required=True, help="folder to write the Hub-format model to")
    convert.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    convert.add_argument(
        "--calibrate-on", metavar="DATA", help="initialise the merger from k-means of layer-K tokens on DATA"
    )
    _add_source_options(convert)
    convert.set_defaults(handler=cmd_convert)
    return parser


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    try:
        code = args.handler(args)
    except RetrofitError as exc:
        if args.verbose:
            raise
        print(f"retrofit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("retrofit: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
