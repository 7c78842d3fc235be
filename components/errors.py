"""One root for every error a user can cause: the CLI prints its message as one line.

    try:
        ...
    except GenflowError as e:   # bad params, bad data, a model or server that cannot do as asked
        print(f"genflow: {e}")   # anything else is a bug and shows its traceback

Each subclass also derives from the builtin a caller would expect (ValueError for bad input,
RuntimeError for a service that failed), so ``except ValueError`` keeps working.
"""
from __future__ import annotations


class GenflowError(Exception):
    """Something the user can fix; the message names the key, file or field and what to do."""


class ConfigError(GenflowError, ValueError):
    """params.yaml, a --set override or a command-line option is not valid."""


class DataError(GenflowError, ValueError):
    """A dataset cannot be read, validated or prepared; the message names the file and rule."""


class ModelError(GenflowError, ValueError):
    """A model cannot be built, trained, evaluated, exported or sampled as asked."""


class RegistryError(GenflowError, ValueError):
    """The MLflow model registry refused or does not hold what was asked."""


class ServerError(GenflowError, RuntimeError):
    """A service (MLflow, Prefect, a DVC remote, the model server) failed or cannot be reached."""


class CheckpointError(ModelError):
    """A training checkpoint on disk cannot be read (truncated, overwritten, not a checkpoint)."""


class ProjectBusyError(GenflowError, RuntimeError):
    """Another genflow process holds this project's lock (.genflow/run.lock); the CLI exits 3."""


def disk_full(e: BaseException) -> str | None:
    """One line for a full disk (ENOSPC) when `e`, or an error it came from, is one, else None:
    genflow's own line where it wrote one (naming the folder), else 'no space left on device: PATH'.
    Libraries that wrap the OSError (the ONNX exporter, DVC) often drop its path."""
    import errno

    seen: set[int] = set()
    stack = [e]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        text = str(err).strip().splitlines()
        if isinstance(err, GenflowError) and text and "no space left on device" in text[0]:
            return text[0]
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            path = err.filename2 or err.filename   # a copy's destination is where space ran out
            where = f": {path}" if path else ""
            return f"no space left on device{where}; free space there and rerun"
        if text and ("No space left on device" in str(err) or "[Errno 28]" in str(err)):
            return f"no space left on device ({text[0][:300]}); free space on that disk and rerun"
        stack += [err.__cause__, err.__context__]
    return None
