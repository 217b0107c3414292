"""The registry's errors: every one is a ``RegistryError`` (a ValueError) whose message names the problem."""


class RegistryError(ValueError):
    """A registry operation is not possible (unknown expert, name taken, bad document...)."""


class ExpertExists(RegistryError):
    """The name is already in the sequence and ``replace`` was not given."""


class ConcurrentModification(RegistryError):
    """The document changed under a writer that believed it held the lock (lease expired)."""


class RegistryLockTimeout(RegistryError):
    """The registry lock could not be acquired in time."""


class BaseModelMismatch(RegistryError):
    """An adapter was trained on another base model than the registry's experts or the served base."""
