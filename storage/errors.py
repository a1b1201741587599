"""Exceptions raised by the artifact layer; the CLI turns them into one-line errors."""


class MemforgeError(Exception):
    """Base class for errors a user can act on (bad input, refused artifact)."""


class ParamsError(MemforgeError):
    """A params file or override is invalid; the message names the dotted key."""


class ArtifactError(MemforgeError):
    """An artifact is missing, unpublished, of unknown schema, or refused for resume."""


class DamagedFileError(ArtifactError, ValueError):
    """A bookkeeping file (manifest, plan, marker, build record) is not valid JSON; the message names it."""
