"""The one exception type that carries a user-facing, one-line message."""


class RetrofitError(Exception):
    """Bad input or an unusable environment: the message says what is wrong and what to do.

    The CLI prints it as a single line on stderr and exits with code 2; Python callers can catch it.
    """

    exit_code = 2


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
