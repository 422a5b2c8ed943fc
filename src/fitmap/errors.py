"""fitmap's exceptions. Every message says what is wrong, the numbers, and the fix.

The CLI turns any :class:`FitmapError` into one line on stderr and exit code 2
(bad input, or a request that cannot fit); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class FitmapError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class BadInput(FitmapError):
    """A malformed argument, a missing or corrupt file, an unknown model name."""


class CheckpointError(BadInput):
    """A checkpoint file is missing, truncated, corrupt, or does not match its config."""


class DoesNotFit(FitmapError):
    """The model and workload need more memory than the devices offer."""


class OutOfBudget(FitmapError):
    """A GPU ran out of memory inside the budget its plan set (the request was larger than planned)."""


class DeviceMismatch(FitmapError):
    """The model code mixed tensors from two devices (found in simulation or at run time)."""


class SimulationFailed(FitmapError):
    """The fake-device replay of a model stopped in an op it cannot run there (not a device mismatch)."""

    exit_code = 1


class MissingWeights(FitmapError):
    """After loading, parameters or buffers were still without storage."""


def remote_code_flag(value: object) -> bool:
    """``trust_remote_code`` as given, when it is a real bool. Anything else (the string
    ``"false"`` is truthy) is refused: running a repository's code is never implied."""
    if type(value) is not bool:
        raise BadInput(
            f"trust_remote_code must be True or False, not {value!r} ({type(value).__name__}); "
            "a model's own code runs only when you pass True"
        )
    return value


def collect(problems: list[str], exc: type[FitmapError] = BadInput) -> None:
    """Raise ``exc`` with all ``problems`` at once (one per line), if there are any."""
    if problems:
        raise exc("\n".join(problems) if len(problems) > 1 else problems[0])


class ModelCodeError(FitmapError):
    """The model's own Python code (``trust_remote_code``) failed under this transformers/torch."""

    @staticmethod
    def raised_in_model_code(e: BaseException) -> bool:
        """Did ``e`` come out of a model's own code (a ``transformers_modules`` file)?"""
        import traceback

        frames = traceback.extract_tb(e.__traceback__)
        return bool(frames) and "transformers_modules" in frames[-1].filename

    @classmethod
    def from_exception(cls, doing: str, e: BaseException) -> ModelCodeError:
        """One line: what failed, where in the model's code, and the versions to try."""
        import traceback

        import torch
        import transformers

        frames = [f for f in traceback.extract_tb(e.__traceback__) if "transformers_modules" in f.filename]
        where = (
            f" at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
        )
        message = " ".join(str(e).split())[:300]
        return cls(
            f"the model's own code failed while {doing}: {type(e).__name__}: {message}{where}. "
            f"It may have been written for other versions than transformers {transformers.__version__} and "
            f"torch {torch.__version__.split('+')[0]}: install the versions its model card pins (fitmap runs "
            "on transformers 4.40 and later)"
        )


def where_in_model_code(e: BaseException) -> str:
    """`` at FILE:LINE (code)`` of the innermost frame in the model's code, if any."""
    import traceback

    frames = [
        f
        for f in traceback.extract_tb(e.__traceback__)
        if "transformers_modules" in f.filename or "/transformers/models/" in f.filename
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({(f.line or '').strip()[:80]})"
