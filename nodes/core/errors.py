"""The pack's two kinds of error: ``ValueError`` for what a user can fix (which input, what is wrong, what to do),
and :class:`InternalError` for a broken invariant of the pack itself (a bug to report, never the user's input)."""


class InternalError(RuntimeError):
    """An internal consistency check failed: a bug in Prompt Anatomy (please report it with the workflow)."""

    def __init__(self, message: str):
        super().__init__(f"Prompt Anatomy internal error: {message}. This is a bug in the pack, not a problem with "
                         f"your inputs; please report it with the workflow.")
