"""The one exception type that carries a user-facing, one-line message, one-line messages for others, and where the
CLI's log lines go (`log_to_stderr`)."""

import contextlib
import errno
import os
import re
import reprlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path


class RetrofitError(Exception):
    """Bad input or an unusable environment: the message says what is wrong and what to do.

    The CLI prints it as a single line on stderr and exits with code 2; Python callers can catch it.
    """

    exit_code = 2

    def __init__(self, message: str = "", *args) -> None:
        # A DataLoader worker's error comes back re-raised as `RetrofitError("Caught RetrofitError in DataLoader
        # worker process N.\nOriginal Traceback ...\nretrofit.errors.RetrofitError: <message>")`: keep the message.
        if (
            isinstance(message, str)
            and message.startswith("Caught RetrofitError")
            and "\nOriginal Traceback" in message
        ):
            message = message.rstrip().rsplit("\n", 1)[-1].split("RetrofitError: ", 1)[-1]
        super().__init__(message, *args)


def log_to_stderr(line: str) -> None:
    """The CLI's log: every progress line, note and warning of a command goes to stderr, so that stdout holds only
    its result (``retrofit evaluate ... > table.md`` keeps the table alone). The Python API logs with `print`. Under
    ``accelerate launch`` only the main process logs: every process runs the same command, and each line came once
    per process."""
    import sys

    from .atomic import is_launch_main

    if is_launch_main():
        print(line, file=sys.stderr, flush=True)


_INTERRUPTED = [0]  # the stop signal that came (`interrupt`) since the command started, until it returns; 0: none
_DEFERRING = [0]  # how many `interrupts_deferred` steps are running: `check_interrupted` waits for them to end
_OWNER = [0]  # the process whose command installed `interrupt` (a forked DataLoader worker inherits it)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``kill``, ``timeout``, a job scheduler, a closed terminal) raised as Ctrl-C is, so that the
    same clean-up runs: they had ended the process at once, without a word, its temporary folder (a whole model)
    left behind. `signum` says which."""

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_signals() -> list:
    """The signals a CLI command stops on, cleaning up: Ctrl-C, SIGTERM and (where there is one) SIGHUP."""
    import signal

    return [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


def _stop(signum: int) -> None:
    import signal

    raise KeyboardInterrupt if signum == signal.SIGINT else Stopped(signum)


def interrupt(signum: int | None = None, frame=None) -> None:
    """The CLI's handler of `stop_signals`: Python's for Ctrl-C (raise KeyboardInterrupt; SIGTERM and SIGHUP raise
    `Stopped`), remembering that it came. Inside a ``__del__`` (a library's, mid-run: `evaluate`'s metric modules)
    it only remembers: raised there, Python printed "Exception ignored" and a traceback, and went on. Raised inside a
    weakref callback, the same happens. Either way the run stops at its next `check_interrupted` (after each training
    step, before an output takes its place), with one line. A forked process (a DataLoader worker) stops on SIGTERM
    or SIGHUP as it would have."""
    import signal

    signum = signum or signal.SIGINT
    if signum != signal.SIGINT and os.getpid() != _OWNER[0]:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _INTERRUPTED[0] = signum
    if not _in_finalizer(frame):
        _stop(signum)


def _in_finalizer(frame) -> bool:
    """Whether `frame` (where a signal came) runs inside a ``__del__``, whose exceptions Python prints and ignores."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _ours(signum: int, handler) -> bool:
    """Whether `handler` of `signum` is Python's own (or the system's) default, which a CLI command may take over."""
    import signal

    return handler is (signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


@contextlib.contextmanager
def interrupts_watched() -> Iterator[None]:
    """For one CLI command: Ctrl-C, SIGTERM and SIGHUP go through `interrupt` (in the main thread, and only where the
    default handler is installed: a caller's stays); afterwards the handlers are restored and the signal forgotten."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in stop_signals()} if main_thread else {}
    taken = {signum: handler for signum, handler in previous.items() if _ours(signum, handler)}
    for signum in taken:
        signal.signal(signum, interrupt)
    _OWNER[0] = os.getpid()
    try:
        yield
    finally:
        _INTERRUPTED[0] = 0
        for signum, handler in taken.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def interrupts_deferred(what: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold a first Ctrl-C (or a CLI command's SIGTERM or SIGHUP) until `what` ends, then stop: torch.onnx's tracer,
    interrupted, aborted the process in C++ (a screen of frames, exit 134, its temporary folder left behind); an
    output's swap, interrupted, left the replaced one half-deleted. A second signal stops at once. Where a caller has
    a handler of its own, or off the main thread, nothing changes."""
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in stop_signals()} if main_thread else {}
    held = {signum: handler for signum, handler in previous.items()
            if handler is interrupt or signum == signal.SIGINT and _ours(signum, handler)}  # fmt: skip
    if not held:
        yield
        return

    def hold(signum: int, frame=None) -> None:
        if _INTERRUPTED[0]:
            _stop(signum)
        _INTERRUPTED[0] = signum
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        with contextlib.suppress(OSError):  # a closed terminal (SIGHUP), a pipe's reader gone: the step goes on
            log(f"stopping once {what} ends ({again} again to stop at once)")

    for signum in held:
        signal.signal(signum, hold)
    _DEFERRING[0] += 1
    try:
        yield
    finally:
        _DEFERRING[0] -= 1
        for signum, handler in held.items():
            signal.signal(signum, handler)
        came = _INTERRUPTED[0]
        if held.get(signal.SIGINT) is signal.default_int_handler:  # a Python call: no CLI command forgets it
            _INTERRUPTED[0] = 0
    if came:
        _stop(came)


def check_interrupted() -> None:
    """Raise KeyboardInterrupt (`Stopped` for SIGTERM, SIGHUP) if a stop signal came since the command started, even
    where it was swallowed: called before an output takes its place and after each training step. Inside a step
    that `interrupts_deferred` holds a signal for, nothing: that step ends first."""
    if _INTERRUPTED[0] and not _DEFERRING[0]:
        _stop(_INTERRUPTED[0])


def brief(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line; past `limit` characters it ends at the last full sentence that fits, or
    at a word boundary with "…"."""
    text = " ".join(str(exc).split())
    if len(text) <= limit:
        return text
    head = text[:limit]
    if ". " in head:
        return head[: head.rindex(". ") + 1]
    return head.rsplit(" ", 1)[0].rstrip(" ,;:(") + " …"


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """``1 step``, ``469 steps``, ``1,000 steps``: a count and its noun, plural (`plural`, or the noun and "s") where
    it is not one."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"


def whole_number(value, name: str) -> int:
    """`value` as Python's int where it is a whole number (NumPy's too), else a one-line error naming the argument
    `name` (``"insert_patch_merger's after_layer"``): a float such as 2.0 or a bool is no count, nor is text."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise RetrofitError(f"{name} must be a whole number, not {shown(value)}")
    return int(value)


def check_arguments(where: str, *, log=print, flags: dict | None = None, count: dict | None = None) -> None:
    """Refuse, before any work, the arguments of a Python call (`where`: ``"finetune"``) that are no settings:
    a `log` that is not a function (a TypeError at its first line, deep inside the run), `flags` that are not True or
    False (``overwrite="no"`` is true), a `count` (name -> value) that is neither None nor a whole number >= 1."""
    if not callable(log):
        raise RetrofitError(
            f"{where}'s log must be a function taking one line of text (print; lambda _: None for none), not "
            f"{shown(log)}"
        )
    for name, value in (flags or {}).items():
        numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
        if not isinstance(value, bool) and not numpy_bool:
            raise RetrofitError(f"{where}'s {name} must be True or False, not {shown(value)}")
    for name, value in (count or {}).items():
        if value is not None and whole_number(value, f"{where}'s {name}") < 1:
            raise RetrofitError(f"{where}'s {name} must be at least 1 (or None), not {value}")


class _Shortened(reprlib.Repr):
    """The short repr `shown` quotes values with: long text, lists and nesting cut with "..."."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 80, 80
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 8

    def repr_instance(self, x, level: int) -> str:  # an object inside a list: its type (a model's repr is long)
        plain = x is None or isinstance(x, int | float | complex | bytes)
        return super().repr_instance(x, level) if plain else f"<{type(x).__name__}>"


_SHORTENED = _Shortened()


def shown(value) -> str:
    """`value` as an error message quotes it: a short repr (``reprlib``: long text, lists and nesting cut with "..."),
    and for any other object its type, as a model passed where a path goes would print as many lines."""
    if isinstance(value, int) and value.bit_length() > 1000:  # Python refuses to write more than 4,300 digits
        digits = int(value.bit_length() * 0.30103)  # log10(2)
        return f"a {'negative ' if value < 0 else ''}number of about {digits} digits"
    if value is None or isinstance(value, str | int | float | bool | tuple | list | dict | set):
        return _SHORTENED.repr(value)
    if hasattr(value, "save_pretrained"):  # a model object where a checkpoint's name or folder goes
        return f"a {type(value).__name__} object (save it with save_pretrained and give its folder)"
    return f"a {type(value).__name__}"


def check_at_least_one(option: str, value: int | None) -> None:
    """Refuse a count below 1 given for `option` (None: not set) with the usual one-line error."""
    if value is not None and value < 1:
        raise RetrofitError(f"{option} must be at least 1 (got {value})")


def did_you_mean(key: str, valid) -> str:
    """A hint for an unknown `key`: "; did you mean 'X'?" for a close match, else the list of valid keys."""
    import difflib

    valid = list(valid)
    match = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(map(str, valid))}"


# Environment variables that name where retrofit and the libraries it calls write caches (most specific first)
CACHE_VARIABLES = ("RETROFIT_CACHE", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_MODULES_CACHE", "HF_HOME")


def describe_os_error(exc: OSError) -> str:
    """A one-line message for a file-system error (full disk, permissions, a file where a folder should be); a path
    under a cache folder an environment variable sets (``HF_HOME``, ...) names that variable, as the user gave no such
    path."""
    given = [_as_given(os.fsdecode(name)) if isinstance(name, str | bytes) else name
             for name in (exc.filename, exc.filename2) if name is not None]  # fmt: skip
    paths = [os.path.abspath(name) for name in given if isinstance(name, str)]
    names = " -> ".join(f"'{name}'" for name in dict.fromkeys(given))
    what = exc.strerror or brief(exc)
    for variable in CACHE_VARIABLES:
        folder = os.environ.get(variable, "").strip()
        where = os.path.abspath(os.path.expanduser(folder))
        if folder and any(Path(path).is_relative_to(where) for path in paths):
            return (
                f"{what}{f' ({names})' if names else ''}, under {variable}={folder}; point {variable} at a folder you "
                "can write, or check its permissions and the free space"
            )
    return f"{what}{f' ({names})' if names else ''}; check the path, its permissions and the free space"


# The sibling an output is written as first (`atomic`): ``.NAME.tmp-`` + tempfile's 8 random characters (+ a suffix).
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-[a-z0-9_]{8}(\.[A-Za-z0-9]+)?")


def _as_given(path: str) -> str:
    """A path with each temporary sibling in it named as the output it becomes: an error writing
    ``out/.model.tmp-k2j4x9qa/config.json`` is about ``out/model/config.json``, the path the user gave."""
    parts = Path(path).parts
    named = [match["name"] if (match := _TEMPORARY.fullmatch(part)) else part for part in parts]
    return path if named == list(parts) else str(Path(*named))


def is_file_system_error(exc: OSError) -> bool:
    """True for an error about a file or the disk (not, say, a network error, which also subclasses OSError)."""
    return exc.filename is not None or exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)


@contextlib.contextmanager
def pickle_refused_quietly() -> Iterator[None]:
    """Loading with ``weights_only=True``: silence torch's note on a pickle protocol it did not write (printed before
    it refuses such a file), so that the refusal reaches the user as the one line retrofit makes of it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        yield


def in_a_launch() -> bool:
    """Whether this process is one of several started by ``accelerate launch`` (torchrun's ``WORLD_SIZE``)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1")


def peer_gone(exc: BaseException) -> bool:
    """Whether `exc` is a collective operation's failure because another process of the launch is gone (stopped by
    a signal, or failed with its own error): gloo's "Connection closed by peer", NCCL's or torch's distributed
    errors. That process printed its own line; this one's traceback says nothing more."""
    if not isinstance(exc, RuntimeError) or not in_a_launch():
        return False
    import torch.distributed

    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc)
    return any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))
