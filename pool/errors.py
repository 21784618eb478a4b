"""Exceptions raised by the pool. All of them are picklable, so they cross process boundaries."""

from __future__ import annotations


class PoolError(Exception):
    """Base class of every error the pool raises itself."""


class ModelLoadError(PoolError):
    """The model could not be loaded (missing path, not a SavedModel, unknown signature or
    output, a TF Hub handle that could not be fetched, no Dask scheduler at the address...).

    Mistakes the parent can see (a missing directory; a signature or output that
    ``saved_model.pb`` does not have) are raised before any worker starts; otherwise the
    message carries the worker's own exception and traceback text.
    """


class WorkerError(PoolError):
    """The model raised inside a worker while answering a shard.

    ``str(error)`` is the message alone: the rows of the shard and the worker's exception;
    ``remote_traceback`` holds the worker's formatted traceback; ``error_type`` the name of the
    exception's class (e.g. ``"InvalidArgumentError"``), for callers that map errors to codes.
    The worker's traceback is also the error's ``__cause__``, so an uncaught ``WorkerError``
    prints it above its own, as ``concurrent.futures.ProcessPoolExecutor`` does.
    """

    def __init__(self, message: str, remote_traceback: str = "", error_type: str = "") -> None:
        super().__init__(message, remote_traceback, error_type)
        self.remote_traceback = remote_traceback
        self.error_type = error_type
        if remote_traceback:  # also after unpickling: pickle calls __init__ with the args
            self.__cause__ = _RemoteTraceback(remote_traceback)

    def __str__(self) -> str:
        return str(self.args[0])


class _RemoteTraceback(Exception):
    """The worker's traceback text, shown as the cause of a :class:`WorkerError`."""

    def __str__(self) -> str:
        return f"\n\nWorker traceback:\n{self.args[0]}"


class WorkerCrashedError(PoolError):
    """A shard's worker died every time it ran the shard (more than ``max_retries`` re-runs)."""


class PoolClosedError(PoolError, RuntimeError):
    """The pool is not running: it was never started or has been shut down."""


class QueueFullError(PoolError):
    """``max_queued_requests`` calls are already waiting for a worker: the call was refused at
    once, and nothing of it was queued. Retry later (a server answers 503)."""
