"""What a command reads: each local data folder once, however many times the command loads it.

A command loads a folder several times (training, evaluation, the held-out images, each setting of a sweep). Were a
folder changed in between (images added while a fine-tune starts), the loads would see different images, and the
images `--holdout` keeps out would be drawn anew: some of them would be images the run trained on. Within a command
run under `reads_each_folder_once`, `retrofit.data` takes every load of a folder from the command's first read
(`COMMAND_READS`); the next command reads the folder as it is then. A Hub dataset likewise: the command asks once
which commit its revision is at, and every load reads that commit, the one its card records (`command_memo`). Light
on purpose (no torch): the modules that decorate their runs with it are imported for ``--help`` too.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# The splits of each local folder the running command has read, by real path, and its answers from the Hub
# (`command_memo`, by tuple); None outside a command.
COMMAND_READS: contextvars.ContextVar[dict[str | tuple, Any] | None] = contextvars.ContextVar(
    "retrofit_reads", default=None
)


def reads_each_folder_once(run: Callable[..., T]) -> Callable[..., T]:
    """For a whole command (finetune, pretrain, evaluate, sweep, convert, a recipe): every load of a local folder
    takes the command's first read of it. A command run by another (a sweep's fine-tunes) shares the other's reads."""

    @functools.wraps(run)
    def whole_run(*args, **kwargs):
        if COMMAND_READS.get() is not None:
            return run(*args, **kwargs)
        token = COMMAND_READS.set({})
        try:
            return run(*args, **kwargs)
        finally:
            COMMAND_READS.reset(token)

    return whole_run


def command_memo(key: tuple, ask: Callable[[], T]) -> T:
    """`ask()`'s answer, asked once per command for `key` (a Hub dataset's commit or split names): a command that
    asked the Hub again later would read or record other files were the dataset pushed to in between. Outside a
    command, asked anew each time."""
    answers = COMMAND_READS.get()
    if answers is None:
        return ask()
    if key not in answers:
        answers[key] = ask()
    return answers[key]
