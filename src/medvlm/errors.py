"""Exception types of medvlm. Each carries one line for the user: which file/row, what is wrong.

The CLI prints `str(error)` without a traceback for these (they are user mistakes or bad data);
anything else is a bug and keeps its traceback.
"""


class MedVLMError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ConfigError(MedVLMError):
    """params.yaml (or an override) names something impossible or missing."""


class DataError(MedVLMError):
    """A manifest, image or data folder cannot be used."""


class ImageDecodeError(DataError):
    """One image file cannot be decoded (corrupt, truncated, not an image, too large)."""


class ValidationFailed(DataError):
    """Too many rows were quarantined by validation."""


class ModelError(MedVLMError):
    """A model, checkpoint or strategy cannot be loaded or built."""


class EvaluationError(MedVLMError):
    """Generated and reference reports do not line up, or a metric cannot be computed."""


class RegistryError(MedVLMError):
    """The MLflow tracking server / registry is unreachable or inconsistent."""


class StageFailed(MedVLMError):
    """A pipeline stage's command stopped on a user error (the CLI's exit code 2): retrying cannot fix it."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when it has none), cut to `limit` characters: what
    the one-line errors of this project quote from a library's exception."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
