"""The one exception type that carries a user-facing, one-line message."""


class RetrofitError(Exception):
    """Bad input or an unusable environment: the message says what is wrong and what to do.

    The CLI prints it as a single line on stderr and exits with code 2; Python callers can catch it.
    """

    exit_code = 2
