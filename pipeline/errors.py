"""The one exception type that the CLI turns into a single line and a non-zero exit."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing input, unreachable cluster).

    The CLI prints `curate: error: <message>` and exits 2; the traceback is shown only
    with --debug.
    """
