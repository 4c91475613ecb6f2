"""The `retrofit` command line: a thin layer over the Python API, the same for every command.

Each command is one settings dataclass (`retrofit.settings`) and one function that runs it: the parser's options
come from the dataclass's fields, the parsed options build the dataclass (which checks them), and the function gets
it. `retrofit run` also takes every recipe setting as an option (`retrofit.settings.RECIPE_SECTIONS`), overriding the
recipe; ``retrofit run RECIPE --help`` shows that recipe's values as the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import os
import signal
import sys
import traceback
from dataclasses import fields
from pathlib import Path

from . import __version__
from .errors import (
    RetrofitError,
    brief,
    check_interrupted,
    describe_os_error,
    in_a_launch,
    interrupts_watched,
    is_file_system_error,
    peer_gone,
)
from .settings import (
    RECIPE_SECTIONS,
    BenchArgs,
    ConvertArgs,
    EvaluateArgs,
    ExportOnnxArgs,
    FinetuneArgs,
    PushArgs,
    RecipeInfo,
    RunArgs,
    SweepArgs,
    add_options,
    from_namespace,
    recipe_key,
)

# name -> (help line, settings dataclass, "module:function" that runs it), in the order `retrofit --help` lists them
COMMANDS: dict[str, tuple[str, type, str]] = {
    "convert": ("insert a PatchMerger into a checkpoint and export it", ConvertArgs, "convert:run_convert"),
    "evaluate": ("top-1/top-5 accuracy and loss of several models, side by side", EvaluateArgs,
                 "evaluation:run_evaluate"),
    "bench": ("measure images/s, latency and memory of source and merged models", BenchArgs, "benchmark:run_bench"),
    "sweep": ("accuracy and speed over after-layer x tokens; pick a setting", SweepArgs, "sweep:run_sweep"),
    "push": ("upload an export to the Hugging Face Hub", PushArgs, "push:run_push"),
    "export-onnx": ("an ONNX graph of an export, any batch size, checked against PyTorch", ExportOnnxArgs,
                    "deploy:run_export_onnx"),
    "finetune": ("insert a PatchMerger and fine-tune it back (Accelerate)", FinetuneArgs, "finetune:run_finetune"),
    "run": ("run a recipe (recipes/*.yaml): merge, fine-tune, evaluate, export", RunArgs, "recipes:run_from_cli"),
}  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (what was wrong, where to look) with exit code 2, and that takes
    no abbreviation of an option: ``--over`` is not read as ``--overwrite`` (a script's shortened option would change
    meaning when a later release adds an option that starts the same)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
    """`message` as the one line an error is: a line break or other control character in it (from a value the user
    gave, such as ``--device $'cuda\\n'``) is written as its escape (``\\n``), as `repr` shows it, and a word longer
    than `LONG_WORD` characters (a pasted value, quoted whole by the message) keeps its start and end around "…"."""
    import re

    text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in message)
    return re.sub(rf"\S{{{LONG_WORD + 1},}}", lambda word: f"{word[0][:120]}…{word[0][-60:]}", text)


LONG_WORD = 200  # characters: paths and ids are shorter; a longer word is cut in the middle


def _command_in(argv: list[str]) -> str | None:
    """The command `argv` names (its first word that is not an option), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def _recipe_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """`run`'s options for every recipe setting, unset unless given. With a readable recipe among `argv`, the help
    shows its values (what applies); else the settings' own defaults."""
    shown: dict[str, dict] = {}
    given: dict[str, dict] = {}  # what the file itself sets (the rest is the settings' defaults)
    recipe = _recipe_in((argv or [])[1:])
    if recipe and _is_file(recipe):
        try:
            import yaml

            from .recipes import load_recipe

            loaded = load_recipe(recipe)
            shown = {section: loaded[section] for section in RECIPE_SECTIONS} | {"": loaded}
            raw = yaml.safe_load(Path(recipe).read_text(encoding="utf-8"))
            given = {section: raw.get(section) or {} for section in RECIPE_SECTIONS} | {"": raw}
        except RetrofitError:
            shown = {}
    for section, groups in {"": (RecipeInfo,), **RECIPE_SECTIONS}.items():
        title = f"recipe section {section}" if section else "recipe (top-level keys)"
        group_parser = parser.add_argument_group(title)
        for group in groups:
            add_options(group_parser, group, unset=True, shown=_by_field(group, shown.get(section, {})),
                        from_recipe=frozenset(_by_field(group, given.get(section, {}))))  # fmt: skip


class _Scratch(_Parser):
    """A parser that says nothing: its errors are exceptions. It reads options as `_Parser` does (no abbreviations)."""

    def error(self, message: str):
        raise ValueError(message)


def _recipe_in(words: list[str]) -> str | None:
    """The recipe `run`'s arguments `words` name, wherever it stands among the options (``run --lr 1e-4 R``: R, not
    the option's value), or None where they do not parse."""
    scratch = _Scratch(add_help=False)
    add_options(scratch, RunArgs)
    for group in (RecipeInfo, *(group for groups in RECIPE_SECTIONS.values() for group in groups)):
        add_options(scratch, group, unset=True)
    try:
        return scratch.parse_known_args(words)[0].recipe
    except ValueError:
        return None


def _is_file(path: str) -> bool:
    """Whether `path` is a file; False where the system cannot even look (a name too long for it)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def _by_field(group: type, values: dict) -> dict:
    """A recipe section's values (by recipe key) by field name, for the fields of `group`."""
    return {spec.name: values[recipe_key(spec)] for spec in fields(group) if recipe_key(spec) in values}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `retrofit` parser. Given `argv`, only the command it names gets its options (`retrofit --help` and the
    other commands need none of them)."""
    parser = _Parser(prog="retrofit", description="Make pretrained Vision Transformers faster with a PatchMerger.")
    parser.add_argument("--version", action="version", version=f"retrofit {__version__}")
    verbose = "show library warnings and full tracebacks"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = None if argv is None else _command_in(argv)
    for name, (help_line, settings, _) in COMMANDS.items():
        command = commands.add_parser(name, help=help_line, description=help_line)
        # -v after the command too (``retrofit convert ... -v``); unset there unless given, so one before it stays
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose)
        if argv is None or name == wanted:
            add_options(command, settings)
            if name == "run":
                rest = None if argv is None else argv[argv.index(name) :]
                _recipe_options(command, rest)
    return parser


def _quiet_libraries() -> None:
    """Silence what is known to be noise for a user of the CLI (``-v`` shows it all): transformers' and
    huggingface_hub's logs (load reports, "Retrying in 8s" lines of an unreachable Hub) and progress bars. Python
    warnings are left alone: a warning that reaches the user is one worth reading (or a bug to fix here)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()
    # datasets' bars ("Generating train split", "Map"): read from the environment when datasets is imported, which
    # most commands never do (importing it here would slow every command down); switched off directly if it is.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        from datasets.utils import disable_progress_bars

        disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 130 interrupted, 141 stdout closed early)."""
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:  # ``retrofit ... | head -1``: the reader left; stop quietly as Unix tools do
        if not _stdout_closed():
            raise  # another pipe than stdout (a worker's): an error to show
        _stdout_to_nowhere()
        return 128 + signal.SIGPIPE
    finally:
        if argv is None:  # the process exits next: a Ctrl-C now would only break the libraries' exit handlers
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stdout_closed() -> bool:
    """Whether stdout's reader is gone: a pipe with no reader polls as an error; a stream without a file descriptor
    (a caller's) fails to flush what it holds."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            return True
        except (OSError, ValueError):
            pass
        return False
    if not hasattr(select, "poll"):  # Windows: no poll; a broken pipe there is stdout's as good as always
        return True
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def _stdout_to_nowhere() -> None:
    """Point the process's stdout at the null device, so that Python's flush at exit does not fail on the closed pipe
    again (with "Exception ignored ... BrokenPipeError")."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):  # no file behind sys.stdout (a caller's stream): nothing to flush
        pass


def _main(argv: list[str]) -> int:
    _writable_stdout()
    _end_with_the_launch()
    with interrupts_watched():  # a Ctrl-C a library swallows still stops the command before it writes
        return _command(argv)


def _end_with_the_launch() -> None:
    """Under ``accelerate launch`` (Linux), have the kernel kill this process when the launcher that started it dies:
    a launcher killed with SIGKILL (an OOM killer, a scheduler) left its processes running on their own, waiting on
    each other for gloo's half-hour timeout, the first one holding the output's write lock, so every retry and
    ``--resume`` was refused as "another retrofit run is writing". SIGKILL, as the launcher's own end: a process
    blocked in a collective operation runs no signal handler."""
    if not in_a_launch() or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: sent when the parent (its thread) ends
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher ended before the request was made: nothing would send it
        os.kill(os.getpid(), signal.SIGKILL)


def _writable_stdout() -> None:
    """Where stdout cannot encode every character (``PYTHONIOENCODING=ascii``, a Windows console's code page), the
    tables' and notes' non-ASCII characters (Δ, →, …) are written as escapes (``\\u0394``), as Python's stderr does,
    instead of a UnicodeEncodeError after the work is done."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "").replace("_", "")
    if encoding not in ("utf8", "utf8sig") and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


# The commands that run as one process, and what each did under `accelerate launch` (finetune, run and evaluate
# share their work across the processes; these would run whole in each).
ONE_PROCESS = {
    "convert": "each writing the same output",
    "sweep": "timing the models against the others on the same machine, each writing the same output",
    "bench": "timing the models against the others on the same machine",
    "export-onnx": "each writing the same file",
    "push": "each uploading the export",
}


def _parse(argv: list[str]) -> argparse.Namespace:
    """`argv` parsed; an unknown option is refused by its command's parser, with the option it may have meant."""
    parser = build_parser(argv)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser._subparsers._group_actions[0].choices[namespace.command]
        options = [name for action in command._actions for name in action.option_strings if name.startswith("--")]
        word = next((word.split("=", 1)[0] for word in unknown if word.startswith("--")), None)
        close = difflib.get_close_matches(word, options, n=1, cutoff=0.6) if word else []
        hint = f"; did you mean {close[0]}?" if close else ""
        more = f" … ({len(unknown)} in all)" if len(unknown) > 6 else ""  # a pasted list: the line stays short
        command.error(f"unrecognized arguments: {' '.join(unknown[:6])}{more}{hint}")
    return namespace


def _command(argv: list[str]) -> int:
    namespace = _parse(argv)
    _, settings, runner = COMMANDS[namespace.command]
    try:
        args = from_namespace(settings, namespace)  # checks every value: one line, before any import of torch
        if not namespace.verbose:
            _quiet_libraries()
        module, function = runner.split(":")
        run = getattr(importlib.import_module(f".{module}", __package__), function)
        if in_a_launch():
            if namespace.command in ONE_PROCESS and not getattr(args, "dry_run", False):
                raise RetrofitError(
                    f"`retrofit {namespace.command}` runs as one process: under accelerate launch each process ran it "
                    f"whole ({ONE_PROCESS[namespace.command]}); run it without accelerate launch"
                )
            # its process group is destroyed before the interpreter is (else gloo may SIGABRT there)
            from .train import keep_process_group

            keep_process_group()
        code = run(args, namespace) if namespace.command == "run" else run(args)
        check_interrupted()  # a stop signal remembered but not acted on (it came in a __del__): not exit 0
    except RetrofitError as exc:
        if namespace.verbose:  # the traceback, then the same line and exit code as without -v
            traceback.print_exc()
        print(f"retrofit: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the file system said no (full disk, permissions): nothing retrofit can work around
        if not is_file_system_error(exc):
            raise
        if namespace.verbose:
            traceback.print_exc()
        print(f"retrofit: error: {one_line(describe_os_error(exc))}{'' if namespace.verbose else ' (-v shows where)'}",
              file=sys.stderr)  # fmt: skip
        return RetrofitError.exit_code
    except RecursionError:  # json/yaml of a file nested thousands deep (damaged or hostile): its parser gave up
        if namespace.verbose:
            traceback.print_exc()
        print("retrofit: error: a file this command read (a config, a report, a checkpoint's record) is nested "
              "too deeply to read: it is damaged; write it again or remove it (-v shows which)",
              file=sys.stderr)  # fmt: skip
        return RetrofitError.exit_code
    except RuntimeError as exc:  # (torch.distributed's errors are RuntimeErrors)
        if not peer_gone(exc):
            raise
        if namespace.verbose:
            traceback.print_exc()
        print(f"retrofit: error: another process of this launch stopped or failed ({brief(exc, 120)}); its "
              "own line says why: fix that, then run the launch again (with --resume where it trained)",
              file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM / SIGHUP (`errors.Stopped`): cleaned up, then one line
        signum = getattr(exc, "signum", signal.SIGINT)
        with contextlib.suppress(OSError):  # (SIGHUP: the terminal may be gone)
            print(f"retrofit: {'interrupted' if signum == signal.SIGINT else f'stopped ({exc})'}", file=sys.stderr)
        return 128 + signum
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
