"""How a build fails besides a mistake in its input (that is runtime.errors.UserError, exit 2)."""


class ValidationFailed(Exception):
    """The artifact was built but does not agree with PyTorch within the recipe's tolerance (exit 1)."""
