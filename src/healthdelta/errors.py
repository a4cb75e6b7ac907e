"""The one error root. Messages are written for the user and never hold an input
path or a data value (CONTRACT §10): the CLI prints them verbatim."""


class HealthDeltaError(Exception):
    """Anything the user can act on; the CLI maps it to `error: <message>`, exit 1."""

    exit_code = 1


class UsageError(HealthDeltaError):
    """Wrong flags or arguments; exit 2."""

    exit_code = 2


class InputError(HealthDeltaError):
    """The export given to us is missing, unreadable, damaged or hostile."""


class StateError(HealthDeltaError):
    """The state directory (registry, lock, identity) is inconsistent or busy."""
