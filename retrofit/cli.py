"""The `retrofit` command line: a thin layer over the Python API (one sub-command per API function)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from . import __version__
from .errors import RetrofitError, describe_os_error, is_file_system_error

Handler = Callable[[argparse.Namespace], int | None]


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of SOURCE")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow SOURCE's own modeling code to run (off by default)"
    )


def _add_merge_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    from .families import ROPE_POSITIONS

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
    parser.add_argument(
        "--rope-positions",
        choices=ROPE_POSITIONS,
        help="RoPE models (DINOv3): rotate each merged token at the mean position of its patches (mean, the "
        "default) or not at all (none)",
    )


def _add_task_option(parser: argparse.ArgumentParser) -> None:
    from .families import TASKS

    parser.add_argument(
        "--task",
        choices=TASKS,
        help="convert SOURCE as its family's classifier or backbone (default: as the checkpoint's own class; e.g. "
        "a DINOv2 backbone gets a new classifier, a full CLIP checkpoint gives its vision tower alone)",
    )


def _add_push_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="upload the export to this Hub repo when done (the login is checked first), e.g. your-user/vit-b16-pm8",
    )
    parser.add_argument("--private", action="store_true", default=None, help="with --push-to-hub: a private repo")
    parser.add_argument(
        "--create-pr",
        action="store_true",
        default=None,
        help="with --push-to-hub: open a pull request on an existing repo (an organisation's) instead of committing",
    )


def cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    convert(
        args.source,
        after_layer=args.after_layer,
        num_tokens=args.tokens,
        rope_positions=args.rope_positions,
        output=args.output,
        task=args.task,
        overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
        calibrate_on=args.calibrate_on,
        calibrate_split=args.calibrate_split,
        calibrate_images=args.calibrate_images,
        image_column=args.image_column,
        push_to_hub=args.push_to_hub,
        private=bool(args.private),
        create_pr=bool(args.create_pr),
    )


def cmd_push(args: argparse.Namespace) -> None:
    from .push import push

    push(
        args.export,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluation import run_from_args

    run_from_args(args)


def cmd_sweep(args: argparse.Namespace) -> None:
    from .sweep import run_from_args

    run_from_args(args)


def cmd_bench(args: argparse.Namespace) -> None:
    from .benchmark import run_from_args

    if args.card:
        from .card import check_card_target

        check_card_target(args.card, args.models)
    report = run_from_args(args, args.models)
    if args.card:
        from .card import update_card

        update_card(args.card, benchmark=report)
        print(f"updated {args.card}/README.md", file=sys.stderr)


def _add_train_options(parser: argparse.ArgumentParser, recipe: bool = False) -> None:
    """Training flags shared by `finetune` and `run` (in `run` they override the recipe; unset = recipe's value)."""
    from .train import LOSSES, PRECISIONS, TRAINABLE

    default = None if recipe else argparse.SUPPRESS
    parser.add_argument("--loss", choices=LOSSES, default=default, help="kd (default; needs no labels), ce or mix")
    parser.add_argument("--train", choices=TRAINABLE, default=default, help="what trains (default: all)")
    parser.add_argument("--epochs", type=float, default=default, help="epochs (fractions allowed; default 1)")
    parser.add_argument("--max-steps", type=int, default=default, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--lr", type=float, default=default, help="peak learning rate (default 2e-4)")
    parser.add_argument("--batch-size", type=int, default=default, help="per-process batch size (default 64)")
    parser.add_argument("--mixed-precision", choices=PRECISIONS, default=default, help="no (default), bf16 or fp16")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=default,
        help="recompute activations in the backward pass (less memory for large models, one more forward pass)",
    )
    parser.add_argument("--seed", type=int, default=default, help="random seed (default 0)")
    parser.add_argument("--report-to", default=default, help="tracker for Accelerate, e.g. tensorboard")
    parser.add_argument("--limit", type=int, default=default, help="use only the first N training images")
    parser.add_argument(
        "--sample",
        type=int,
        metavar="N",
        default=default,
        help="train on a shuffled sample of N images (seeded by --seed; from the Hub only those are downloaded)",
    )
    parser.add_argument("--eval-limit", type=int, default=default, help="use only the first N evaluation images")
    parser.add_argument("--checkpoint-dir", default=default, help="where checkpoints go (default <output>-checkpoints)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace --output and old checkpoints")


def cmd_finetune(args: argparse.Namespace) -> None:
    from .train import finetune

    names = (
        "data split eval_split image_column label_column limit sample eval_limit loss temperature alpha feature_weight "
        "train epochs max_steps lr merger_lr_scale weight_decay warmup_ratio batch_size grad_accum max_grad_norm "
        "mixed_precision gradient_checkpointing seed augment num_workers eval_every save_every keep_checkpoints "
        "checkpoint_dir resume overwrite report_to num_labels"
    ).split()
    settings = {name: getattr(args, name) for name in names if hasattr(args, name)}
    finetune(
        args.source,
        output=args.output,
        after_layer=args.after_layer,
        num_tokens=args.tokens,
        rope_positions=args.rope_positions,
        task=args.task,
        calibrate=not args.no_calibrate,
        calibrate_images=args.calibrate_images,
        teacher=args.teacher,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
        push_to_hub=args.push_to_hub,
        private=bool(args.private),
        create_pr=bool(args.create_pr),
        **settings,
    )


def cmd_run(args: argparse.Namespace) -> None:
    from .recipes import FLAG_KEYS, _parse_value, run_recipe

    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items() if getattr(args, flag, None) is not None}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise RetrofitError(f"--set {item!r} must look like section.key=value, e.g. training.epochs=0.5")
        overrides[key.strip()] = _parse_value(value)
    run_recipe(args.recipe, overrides, overwrite=args.overwrite, resume=args.resume)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (what was wrong, where to look) with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _convert_options(parser: argparse.ArgumentParser) -> None:
    """`retrofit convert`: its arguments and handler."""
    parser.add_argument("source", help="Hub model id or local folder")
    _add_merge_options(parser)
    _add_task_option(parser)
    parser.add_argument("--output", "-o", required=True, help="folder to write the Hub-format model to")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--calibrate-on",
        metavar="DATA",
        help="initialise the merger from k-means of layer-K tokens on DATA (fashion-mnist, an image folder or a Hub "
        "dataset id)",
    )
    parser.add_argument("--calibrate-split", default="train", help="split of DATA to calibrate on (default train)")
    parser.add_argument(
        "--calibrate-images", type=int, default=256, help="images to calibrate on, a shuffled sample (default 256)"
    )
    parser.add_argument("--image-column", default="image", help="image column of DATA (default image)")
    _add_push_options(parser)
    _add_source_options(parser)
    parser.set_defaults(handler=cmd_convert)


def _evaluate_options(parser: argparse.ArgumentParser) -> None:
    """`retrofit evaluate`: its arguments and handler."""
    parser.add_argument("models", nargs="+", help="checkpoints, Hub ids or exports (the first sets the labels)")
    parser.add_argument("--data", required=True, help="fashion-mnist, an image folder or a Hub dataset id")
    parser.add_argument("--split", default="validation", help="split to evaluate on (default validation)")
    parser.add_argument("--limit", type=int, help="use only the first N images")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch and process (default 64)")
    parser.add_argument("--top-k", type=int, default=5, help="k of the top-k accuracy (default 5)")
    parser.add_argument("--image-column", default="image", help="image column of the dataset (default image)")
    parser.add_argument("--label-column", default="label", help="label column of the dataset (default label)")
    parser.add_argument("--json", metavar="FILE", help="write the results to FILE")
    parser.add_argument("--overwrite", action="store_true", help="replace a --json report an earlier run wrote")
    parser.add_argument("--card", metavar="EXPORT", help="write the results into this export's README.md")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the models' own code to run (off by default)"
    )
    parser.set_defaults(handler=cmd_evaluate)


def _bench_options(parser: argparse.ArgumentParser) -> None:
    """`retrofit bench`: its arguments and handler."""
    parser.add_argument(
        "models",
        nargs="+",
        help="checkpoint folders, Hub ids, exports, or random-weight shapes (vit-b16, ..., dinov3-vitb16, beit-b16)",
    )
    from .benchmark import add_arguments as _add_bench_arguments

    _add_bench_arguments(parser)
    parser.add_argument("--card", metavar="EXPORT", help="write the speed table into this export's README.md")
    parser.set_defaults(handler=cmd_bench)


def _sweep_options(parser: argparse.ArgumentParser) -> None:
    """`retrofit sweep`: its arguments and handler."""
    parser.add_argument("source", help="Hub model id or local folder (an unmerged classifier or backbone)")
    parser.add_argument("--after-layer", required=True, metavar="K,...", help="comma-separated K values, e.g. 3,6,9")
    parser.add_argument("--tokens", required=True, metavar="M,...", help="comma-separated M values, e.g. 4,8,16")
    parser.add_argument("--data", help="fashion-mnist, an image folder or a Hub dataset id (not with --dry-run)")
    parser.add_argument("--split", default="test", help="split to measure accuracy on (default test)")
    parser.add_argument("--calibrate-split", default="train", help="split to calibrate/fine-tune on (default train)")
    parser.add_argument("--limit", type=int, default=1000, help="evaluate on the first N images (default 1000)")
    parser.add_argument("--calibrate-images", type=int, default=256, help="calibration images (default 256)")
    parser.add_argument(
        "--method", default="calibrate", help="calibrate (k-means init, default) or finetune (short fine-tune)"
    )
    parser.add_argument("--finetune-steps", type=int, default=100, help="steps per setting with --method finetune")
    parser.add_argument(
        "--finetune-batch-size",
        type=int,
        default=64,
        help="batch size of those steps (default 64); they read a shuffled sample of steps × this many images",
    )
    parser.add_argument("--target-speedup", type=float, help="name the most accurate setting at least this fast")
    parser.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default 64)")
    parser.add_argument("--bench-batch-size", type=int, default=32, help="batch size of the speed test (default 32)")
    parser.add_argument("--bench-repeats", type=int, default=3, help="timed repeats of the speed test (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N for the speed test (default cpu)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 for the speed test (default fp32)")
    parser.add_argument("--output", "-o", help="folder for sweep.md/json/png (default sweep-<source name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print each setting's theoretical GFLOPs and FLOPs ratio from the config alone (no weights, data or "
        "measurement; nothing written)",
    )
    parser.set_defaults(handler=cmd_sweep)


def _push_options(parser: argparse.ArgumentParser) -> None:
    """`retrofit push`: its arguments and handler."""
    parser.add_argument("export", help="the export folder (output of convert/finetune)")
    parser.add_argument("--repo-id", required=True, help="Hub repo to create or update, e.g. your-user/vit-b16-pm8")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", help="branch to push to (created if needed; default main)")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument(
        "--create-pr",
        action="store_true",
        help="open a pull request on an existing repo instead of committing to it (e.g. an organisation's repo)",
    )
    parser.set_defaults(handler=cmd_push)


def _finetune_options(parser: argparse.ArgumentParser) -> None:
    """`retrofit finetune`: its arguments and handler."""
    parser.add_argument("source", help="Hub model id, local folder, or a retrofit export to continue training")
    _add_merge_options(parser, required=False)
    _add_task_option(parser)
    parser.add_argument("--data", required=True, help="fashion-mnist, an image folder, or a Hub dataset id")
    parser.add_argument("--output", "-o", required=True, help="folder to write the Hub-format model to")
    _add_train_options(parser)
    parser.add_argument("--split", default=argparse.SUPPRESS, help="training split (default train)")
    parser.add_argument("--eval-split", default=argparse.SUPPRESS, help="evaluation split (default test)")
    parser.add_argument("--image-column", default=argparse.SUPPRESS, help="image column (default image)")
    parser.add_argument("--label-column", default=argparse.SUPPRESS, help="label column (default label)")
    parser.add_argument("--temperature", type=float, default=argparse.SUPPRESS, help="KD temperature (default 2)")
    parser.add_argument("--alpha", type=float, default=argparse.SUPPRESS, help="CE weight in --loss mix (0.5)")
    parser.add_argument(
        "--feature-weight",
        type=float,
        default=argparse.SUPPRESS,
        help="kd/mix: weight of distilling the features the head reads (default 0; backbones 1)",
    )
    parser.add_argument(
        "--merger-lr-scale", type=float, default=argparse.SUPPRESS, help="merger's lr = lr × this (default 1)"
    )
    parser.add_argument("--weight-decay", type=float, default=argparse.SUPPRESS, help="AdamW weight decay (0.05)")
    parser.add_argument("--warmup-ratio", type=float, default=argparse.SUPPRESS, help="warm-up fraction (0.05)")
    parser.add_argument("--grad-accum", type=int, default=argparse.SUPPRESS, help="gradient accumulation steps")
    parser.add_argument("--max-grad-norm", type=float, default=argparse.SUPPRESS, help="gradient clipping (1.0)")
    parser.add_argument("--augment", action="store_true", default=argparse.SUPPRESS, help="random crops + flips")
    parser.add_argument("--num-workers", type=int, default=argparse.SUPPRESS, help="dataloader workers (0)")
    parser.add_argument("--eval-every", type=int, default=argparse.SUPPRESS, help="evaluate every N steps")
    parser.add_argument("--save-every", type=int, default=argparse.SUPPRESS, help="checkpoint every N steps (200)")
    parser.add_argument("--keep-checkpoints", type=int, default=argparse.SUPPRESS, help="checkpoints kept (2)")
    parser.add_argument(
        "--num-labels",
        type=int,
        default=argparse.SUPPRESS,
        help="a new N-class classifier (implies --task image-classification)",
    )
    parser.add_argument("--teacher", help="KD teacher (default: SOURCE, or the export's source)")
    parser.add_argument("--no-calibrate", action="store_true", help="keep the merger's random initialisation")
    parser.add_argument(
        "--calibrate-images", type=int, default=256, help="training images to calibrate on, a shuffled sample (256)"
    )
    _add_push_options(parser)
    _add_source_options(parser)
    parser.set_defaults(handler=cmd_finetune)


def _run_options(parser: argparse.ArgumentParser) -> None:
    """`retrofit run`: its arguments and handler."""
    parser.add_argument("recipe", help="path to a recipe YAML file")
    parser.add_argument("--source", help="override the recipe's source")
    _add_task_option(parser)
    parser.add_argument("--output", "-o", help="override export.output")
    parser.add_argument("--data", help="override data.name")
    _add_merge_options(parser, required=False)
    _add_train_options(parser, recipe=True)
    _add_push_options(parser)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any field, e.g. training.lr=1e-4")
    parser.set_defaults(handler=cmd_run)


# name -> (help line, function adding the command's arguments), in the order `retrofit --help` lists them
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "convert": ("insert a PatchMerger into a checkpoint and export it", _convert_options),
    "evaluate": ("top-1/top-5 accuracy and loss of several models, side by side", _evaluate_options),
    "bench": ("measure images/s, latency and memory of source and merged models", _bench_options),
    "sweep": ("accuracy and speed over after-layer x tokens; pick a setting", _sweep_options),
    "push": ("upload an export to the Hugging Face Hub", _push_options),
    "finetune": ("insert a PatchMerger and fine-tune it back (Accelerate)", _finetune_options),
    "run": ("run a recipe (recipes/*.yaml): merge, fine-tune, evaluate, export", _run_options),
}


def _command_in(argv: list[str]) -> str | None:
    """The command `argv` names (its first word that is not an option), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `retrofit` parser. Given `argv`, only the command it names gets its arguments: they import that command's
    module (torch, transformers), which `retrofit --help` and the other commands do not need."""
    parser = _Parser(prog="retrofit", description="Make pretrained Vision Transformers faster with a PatchMerger.")
    parser.add_argument("--version", action="version", version=f"retrofit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = None if argv is None else _command_in(argv)
    for name, (help_line, add_arguments) in COMMANDS.items():
        command = commands.add_parser(name, help=help_line)
        if argv is None or name == wanted:
            add_arguments(command)
    return parser


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # huggingface_hub logs each retry of an unreachable Hub ("Retrying in 8s"); the one-line error says it all
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    # datasets' bars ("Generating train split", "Map"): read from the environment when datasets is imported, which
    # most commands never do (importing it here would slow every command down); switched off directly if it is.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        from datasets.utils import disable_progress_bars

        disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    try:
        code = args.handler(args)
    except RetrofitError as exc:
        if args.verbose:
            raise
        print(f"retrofit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the file system said no (full disk, permissions): nothing retrofit can work around
        if args.verbose or not is_file_system_error(exc):
            raise
        print(f"retrofit: error: {describe_os_error(exc)} (-v shows where)", file=sys.stderr)
        return RetrofitError.exit_code
    except KeyboardInterrupt:
        print("retrofit: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
