"""Errors a user can act on. The CLI prints the message (no traceback) and exits with 2."""


class UserInputError(ValueError):
    """Bad input: a config value, an image, a prefix, a credential. Retrying will not help."""
