"""The base of every error a user can fix (a config key, a data file, a model folder, a LoRA file).

The CLI prints these as one line and exits 2; anything else is a bug and keeps its traceback. This module imports
nothing, so the CLI can catch the base before torch or diffusers is imported.
"""


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the key or file and the fix."""
