"""The one exception type for user mistakes.

Anything the user can fix (a bad file, an unknown option, a value out of range) raises
`UserError`; the CLI prints its message and exits non-zero without a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: the message says where it is and what to do."""
