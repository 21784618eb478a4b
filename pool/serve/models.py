"""The served models and their versions: version policy, base-path polling, hot reload, lookup.

    ModelRegistry ── Model "resnet" (base_path, policy, labels)
                   │   ├── version 1: PredictionPool (its own workers)   AVAILABLE
                   │   └── version 2: PredictionPool (loading)           LOADING
                   └── Model "text" ...
    poller thread: every file_system_poll_wait_seconds, for every model:
        complete versions on disk ─ policy ─▶ wanted ─▶ load the new ones (new pools, new
        workers) ─▶ AVAILABLE: unpinned traffic moves to the highest ─▶ unwanted versions:
        UNLOADING (no new request; the ones holding it finish) ─▶ pool drained, stopped ─▶ END
    ...and every model_config_file_poll_wait_seconds: re-read the model config file.

One pool per version: while a new version loads, the old one answers with its own workers, so
a version switch fails no request and never mixes two versions in one answer. Rules (also in
docs/serving.md, "Versions and several models"):

- *Complete version.* A numbered directory under the base path holding ``saved_model.pb`` and,
  when it has a ``variables/`` directory, ``variables/variables.index``. At start-up the
  complete versions are taken as they are; later a new or changed directory is loaded only once
  its files (names, sizes, modification times) are unchanged between two polls, so a copy in
  progress is not loaded half-written.
- *A failed load never replaces a working version.* The failed version is END with its error
  in the status and is not tried again until its files change; the policy is applied to the
  other versions, so the old one keeps serving.
- *An unwanted version is unloaded* once the model has another AVAILABLE version, or at once
  when its directory is gone (or its model left the config file).
- *Lookup* (:meth:`ModelRegistry.acquire`, :meth:`ModelRegistry.lookup`): name, version, label
  → an AVAILABLE version, or :class:`ModelNotFound` with TF Serving's message and code.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelLoadError, PoolClosedError
from .model_config import ModelSpec, VersionPolicy

log = logging.getLogger("pool.serve")

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"
#: Seconds an unloading version waits for the requests holding it before its pool is stopped
#: anyway (its queued shards still finish: ``shutdown`` waits for them).
UNLOAD_WAIT_SECONDS = 60.0


class ModelNotFound(LookupError):
    """No served version for a request: REST answers ``http_status`` (404, or 400 for an
    unknown label as TF Serving does), gRPC the status ``code`` (``NOT_FOUND`` or
    ``INVALID_ARGUMENT``). The message is TF Serving's."""

    def __init__(self, message: str, code: str = "NOT_FOUND") -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    @property
    def http_status(self) -> int:
        return 404 if self.code == "NOT_FOUND" else 400


@dataclass(eq=False)
class Version:
    """One version of a model and its pool. ``state`` is TF Serving's ``ModelVersionStatus``
    state; ``error`` its ``error_message`` (``error_code`` ``UNKNOWN`` when set)."""

    model: str
    number: int
    path: str
    pool: Any = None
    state: str = START
    error: str = ""
    owned: bool = True  # False: a pool its caller starts and stops (create_app(pool, ...))
    users: int = 0  # requests holding it (acquire/release)
    fingerprint: tuple = ()
    seen: float = field(default_factory=time.monotonic)  # when its directory was first seen
    ready: float | None = None  # when it became AVAILABLE

    @property
    def name(self) -> str:
        return str(self.number)

    def current_state(self) -> str:
        if self.owned:
            return self.state
        try:
            self.pool.signature  # noqa: B018  (raises when the pool is not running)
        except PoolClosedError:
            return START if getattr(self.pool, "startup_seconds", None) is None else END
        return AVAILABLE

    def status(self) -> dict:
        """This version's entry of ``GetModelStatusResponse`` as TF Serving writes it."""
        return {
            "version": self.name,
            "state": self.current_state(),
            "status": {
                "error_code": "UNKNOWN" if self.error else "OK",
                "error_message": self.error,
            },
        }


@dataclass(eq=False)
class Model:
    spec: ModelSpec
    versions: dict[int, Version] = field(default_factory=dict)
    pending: dict[int, tuple] = field(default_factory=dict)  # version -> fingerprint last poll
    removed: bool = False

    def available(self) -> list[Version]:
        return sorted(
            (v for v in self.versions.values() if v.current_state() == AVAILABLE or not v.owned),
            key=lambda v: v.number,
        )


def fingerprint(path: str) -> tuple | None:
    """What identifies a complete version directory's contents (every file's relative path,
    size and modification time), or ``None`` while it is not complete: no ``saved_model.pb``,
    or a ``variables/`` directory without ``variables.index``."""
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        return None
    variables = os.path.join(path, "variables")
    if os.path.isdir(variables) and not os.path.isfile(os.path.join(variables, "variables.index")):
        return None
    files = []
    for root, _, names in os.walk(path):
        for n in names:
            full = os.path.join(root, n)
            try:
                st = os.stat(full)
            except OSError:  # removed while listed: not stable
                return None
            files.append((os.path.relpath(full, path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(files))


def versions_on_disk(base_path: str) -> dict[int, str]:
    """Numbered subdirectories of ``base_path`` (TF Serving's layout), complete or not."""
    try:
        entries = os.listdir(base_path)
    except OSError:
        return {}
    out = {}
    for e in entries:
        if e.isdigit() and os.path.isdir(os.path.join(base_path, e)):
            out[int(e)] = os.path.join(base_path, e)
    return out


class ModelRegistry:
    """The models a server serves, each version in its own pool.

    ``specs``: the models (:class:`~pool.serve.model_config.ModelSpec`); ``pool_factory(path,
    spec)`` builds an unstarted pool for one version; ``poll_seconds``: TF Serving's
    ``--file_system_poll_wait_seconds`` (0: the base paths are read once, at start);
    ``config_file`` and ``config_poll_seconds``: the model config file and
    ``--model_config_file_poll_wait_seconds`` (0: read once)."""

    def __init__(
        self,
        specs: list[ModelSpec],
        pool_factory: Callable[[str, ModelSpec], Any],
        *,
        poll_seconds: float = 1.0,
        config_file: str | None = None,
        config_poll_seconds: float = 0.0,
        unload_wait_seconds: float = UNLOAD_WAIT_SECONDS,
        signature_name: str = "serving_default",
    ) -> None:
        self._factory = pool_factory
        self.signature_name = signature_name
        self._lock = threading.Lock()
        self._models: dict[str, Model] = {s.name: Model(s) for s in specs}
        self.poll_seconds = poll_seconds
        self.config_file = config_file
        self.config_poll_seconds = config_poll_seconds
        self.unload_wait_seconds = unload_wait_seconds
        self._config_stamp: tuple | None = _stamp(config_file) if config_file else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def single(cls, pool: Any, name: str, version: str | int = 1) -> ModelRegistry:
        """A registry serving one pool its caller starts and stops, as ``name``/``version``."""
        spec = ModelSpec(name, "", VersionPolicy("specific", versions=(int(version),)))
        registry = cls(
            [spec], lambda path, spec: pool, poll_seconds=0, signature_name=pool.signature_name
        )
        registry._models[name].versions[int(version)] = Version(
            name, int(version), "", pool=pool, owned=False
        )
        return registry

    # --- lookup ---------------------------------------------------------------------------
    def specs(self) -> list[ModelSpec]:
        with self._lock:
            return [m.spec for m in self._models.values() if not m.removed]

    @property
    def names(self) -> list[str]:
        with self._lock:
            return [n for n, m in self._models.items() if not m.removed]

    def lookup(
        self, name: str, version: int | str | None = None, label: str | None = None
    ) -> Version:
        """The version serving a request for model ``name``, pinned to ``version`` or
        ``label`` or (neither) the highest AVAILABLE one; :class:`ModelNotFound` otherwise."""
        with self._lock:
            return self._lookup(name, version, label)

    def acquire(
        self, name: str, version: int | str | None = None, label: str | None = None
    ) -> Version:
        """:meth:`lookup`, and hold the version until :meth:`release`: an unloading version
        stops its pool only once no request holds it."""
        with self._lock:
            found = self._lookup(name, version, label)
            found.users += 1
            return found

    def release(self, version: Version) -> None:
        with self._lock:
            version.users -= 1

    def _lookup(self, name: str, version: int | str | None, label: str | None) -> Version:
        model = self._models.get(name)
        if label is not None:
            labels = model.spec.labels if model is not None and not model.removed else {}
            if label not in labels:
                raise ModelNotFound(
                    f"Unrecognized servable version label: {label}", "INVALID_ARGUMENT"
                )
            version = labels[label]
        if version is not None:
            text = str(version)
            if not text.isdigit():
                raise ModelNotFound(f"expected a numeric version, got {text!r}", "INVALID_ARGUMENT")
            number = int(text)
            found = None if model is None or model.removed else model.versions.get(number)
            if found is None or (found.owned and found.state != AVAILABLE):
                raise ModelNotFound(f"Servable not found for request: Specific({name}, {number})")
            return found
        available = [] if model is None or model.removed else model.available()
        if not available:
            raise ModelNotFound(f"Servable not found for request: Latest({name})")
        return available[-1]

    def status(self, name: str, version: int | str | None = None) -> dict:
        """TF Serving's ``GetModelStatusResponse`` for model ``name`` (every version it has
        known, unloaded and failed ones included) or one ``version``."""
        with self._lock:
            model = self._models.get(name)
            if model is None or model.removed:
                if version is None:
                    raise ModelNotFound(f"Could not find any versions of model {name}")
                raise ModelNotFound(f"Could not find version {version} of model {name}")
            if version is None:
                entries = sorted(model.versions.values(), key=lambda v: v.number)
                if not entries:
                    raise ModelNotFound(f"Could not find any versions of model {name}")
            else:
                text = str(version)
                found = model.versions.get(int(text)) if text.isdigit() else None
                if found is None:
                    raise ModelNotFound(f"Could not find version {text} of model {name}")
                entries = [found]
            return {"model_version_status": [v.status() for v in entries]}

    def serving(self) -> dict[str, list[str]]:
        """``{model: [AVAILABLE versions]}``."""
        with self._lock:
            return {
                n: [v.name for v in m.available()] for n, m in self._models.items() if not m.removed
            }

    def default_pool(self) -> Any:
        """The pool of the first model's highest AVAILABLE version (metrics read it)."""
        with self._lock:
            for m in self._models.values():
                available = m.available()
                if available and not m.removed:
                    return available[-1].pool
        return None

    def pools(self) -> list[Any]:
        with self._lock:
            return [v.pool for m in self._models.values() for v in m.versions.values() if v.pool]

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Load every model's versions under its policy (blocking), then poll in a thread.
        Raises :class:`pool.ModelLoadError` if a model ends with no AVAILABLE version."""
        for model in list(self._models.values()):
            while True:  # a failed version makes way for the next one the policy picks
                failures = sum(1 for v in model.versions.values() if v.error)
                self._apply(model, initial=True)
                if model.available() or failures == sum(
                    1 for v in model.versions.values() if v.error
                ):
                    break
            if not model.available():
                failed = [v for v in model.versions.values() if v.error]
                self.stop(kill=True)
                if failed:
                    raise ModelLoadError(
                        f"model {model.spec.name!r}: no version loaded; version "
                        f"{failed[-1].number}: {failed[-1].error}"
                    )
                raise ModelLoadError(
                    f"model {model.spec.name!r}: expected numbered SavedModel version "
                    f"directories under {model.spec.base_path!r} matching the version policy "
                    f"({model.spec.policy.describe()}), found none"
                )
        self.warn_if_oversubscribed()
        if self.poll_seconds > 0 or (self.config_file and self.config_poll_seconds > 0):
            self._thread = threading.Thread(target=self._poll_loop, name="pool-serve-poll")
            self._thread.daemon = True
            self._thread.start()

    def stop(self, kill: bool = False) -> None:
        """Stop polling and every pool this registry started."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=120)
        for model in self._models.values():
            for v in model.versions.values():
                if v.owned and v.pool is not None:
                    v.pool.shutdown(kill=kill)
                    if v.state != END:
                        v.state = END

    def _poll_loop(self) -> None:
        next_files = next_config = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if self.config_file and self.config_poll_seconds > 0 and now >= next_config:
                    next_config = now + self.config_poll_seconds
                    self.reload_config()
                if self.poll_seconds > 0 and now >= next_files:
                    next_files = now + self.poll_seconds
                    for model in list(self._models.values()):
                        if self._stop.is_set():
                            return
                        self._apply(model)
            except Exception:  # never let the poller die: the next poll tries again
                log.exception("model poll failed")
            waits = [t for t in (next_files, next_config) if t > time.monotonic()]
            self._stop.wait(min(waits) - time.monotonic() if waits else 0.05)

    def poll(self) -> None:
        """One poll of every model's base path (what the poller thread does)."""
        for model in list(self._models.values()):
            self._apply(model)

    def reload_config(self) -> bool:
        """Re-read the model config file if it changed: models added are loaded, removed ones
        unloaded, changed ones follow their new policy, labels and base path. A file that does
        not parse is logged and the running configuration kept. Returns whether it applied."""
        from .model_config import ConfigError, read

        assert self.config_file is not None
        stamp = _stamp(self.config_file)
        if stamp == self._config_stamp:
            return False
        try:
            specs = read(self.config_file)
        except ConfigError as exc:
            log.error("model config not reloaded, the running models are kept: %s", exc)
            self._config_stamp = stamp
            return False
        self._config_stamp = stamp
        wanted = {s.name: s for s in specs}
        added = []
        with self._lock:
            for name, model in self._models.items():
                if name not in wanted and not model.removed:
                    model.removed = True
                    log.info("model config: model %r removed; unloading it", name)
            for s in specs:
                known = self._models.get(s.name)
                if known is None:
                    self._models[s.name] = Model(s)
                    added.append(s.name)
                    log.info("model config: model %r added (%s)", s.name, s.base_path)
                elif known.removed:
                    known.removed, known.spec = False, s
                    log.info("model config: model %r added again (%s)", s.name, s.base_path)
                elif known.spec != s:
                    known.spec = s
                    log.info("model config: model %r changed", s.name)
        for name, model in list(self._models.items()):
            self._apply(model, initial=name in added)  # a new model loads what it finds
        with self._lock:
            for name in [n for n, m in self._models.items() if m.removed]:
                if all(v.state == END for v in self._models[name].versions.values()):
                    del self._models[name]
        self.warn_if_oversubscribed()
        return True

    def _apply(self, model: Model, initial: bool = False) -> None:
        """Bring ``model`` to what its policy asks of its base path: load new versions, then
        unload unwanted ones."""
        spec = model.spec
        on_disk = {} if model.removed else versions_on_disk(spec.base_path)
        complete: dict[int, tuple] = {}
        for number, path in on_disk.items():
            fp = fingerprint(path)
            if fp is None:
                continue
            known = model.versions.get(number)
            if known is not None and known.fingerprint == fp and not known.error:
                complete[number] = fp  # loaded (or loading, or unloaded) from these very files
                continue
            if known is not None and known.error and known.fingerprint == fp:
                continue  # failed with these files: not tried again until they change
            if not initial and model.pending.get(number) != fp:
                model.pending[number] = fp  # new or changing: wait for one more poll
                continue
            complete[number] = fp
        model.pending = {n: fp for n, fp in model.pending.items() if n in on_disk}
        wanted = set(spec.policy.select(sorted(complete)))
        for number in sorted(wanted, reverse=True):
            known = model.versions.get(number)
            if known is not None and known.state in (LOADING, AVAILABLE):
                continue
            if self._stop.is_set() and not initial:
                return
            self._load(model, number, on_disk[number], complete[number])
        # unload what is no longer wanted, once another version answers (or its files are gone)
        live = [v for v in model.versions.values() if v.owned and v.state == AVAILABLE]
        keep_one = None
        if not model.removed and not any(v.number in wanted for v in live):
            on_disk_live = [v for v in live if v.number in on_disk]
            keep_one = max(on_disk_live, key=lambda v: v.number) if on_disk_live else None
        for v in live:
            if v.number not in wanted and v is not keep_one:
                self._unload(
                    v,
                    "its directory is gone"
                    if v.number not in on_disk
                    else (
                        "its model left the config"
                        if model.removed
                        else f"not wanted by the version policy ({spec.policy.describe()})"
                    ),
                )

    def _load(self, model: Model, number: int, path: str, fp: tuple) -> None:
        spec = model.spec
        with self._lock:
            version = Version(spec.name, number, path, state=LOADING, fingerprint=fp)
            model.versions[number] = version
            model.pending.pop(number, None)
        started = time.perf_counter()
        log.info("model %r version %d: loading %s", spec.name, number, path)
        try:
            pool = self._factory(path, spec)
            version.pool = pool
            pool.start()
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}".strip()
            with self._lock:
                version.state, version.error = END, message
            current = [v.name for v in model.available()]
            log.error(
                "model %r version %d failed to load; %s: %s",
                spec.name,
                number,
                f"version(s) {', '.join(current)} keep serving" if current else "nothing serves",
                message,
            )
            if version.pool is not None:
                version.pool.shutdown(kill=True)
            return
        with self._lock:
            version.state = AVAILABLE
            version.ready = time.monotonic()
        log.info(
            "model %r version %d: AVAILABLE (%d workers ready in %.1f s)",
            spec.name,
            number,
            getattr(pool, "workers", 0),
            time.perf_counter() - started,
            extra={"model": spec.name, "version": str(number)},
        )

    def _unload(self, version: Version, why: str) -> None:
        with self._lock:
            version.state = UNLOADING
        log.info("model %r version %d: unloading (%s)", version.model, version.number, why)
        deadline = time.monotonic() + self.unload_wait_seconds
        while version.users > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if version.users > 0:
            log.warning(
                "model %r version %d: %d request(s) still hold it after %.0f s; stopping it",
                version.model,
                version.number,
                version.users,
                self.unload_wait_seconds,
            )
        if version.pool is not None:
            version.pool.shutdown()  # waits for the shards already queued
        with self._lock:
            version.state = END
        log.info("model %r version %d: END", version.model, version.number)

    # --- cores ----------------------------------------------------------------------------
    def warn_if_oversubscribed(self) -> None:
        """Log a warning when the served versions' workers outnumber the cores."""
        from ..process import default_workers as usable_cores

        cores = usable_cores()
        with self._lock:
            pools = [
                (m.spec.name, v.number, getattr(v.pool, "workers", 0))
                for m in self._models.values()
                for v in m.versions.values()
                if v.owned and v.state == AVAILABLE
            ]
        total = sum(w for _, _, w in pools)
        if total > cores:
            log.warning(
                "%d workers for %d cores (%s): models share the cores and each is slower; "
                "lower --workers (docs/serving.md, 'Cores and several models')",
                total,
                cores,
                ", ".join(f"{n}/{v}: {w}" for n, v, w in pools),
            )


def _stamp(path: str | None) -> tuple | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def default_workers(models: int, cores: int | None = None) -> int:
    """Workers per version when ``--workers`` is not given: the cores shared between the
    models (at least one each), measured in docs/serving.md, 'Cores and several models'."""
    if cores is None:
        from ..process import default_workers as usable_cores

        cores = usable_cores()
    return max(1, cores // max(1, models))


def is_base_path(model: str) -> bool:
    """A local directory that is not itself a SavedModel and holds numbered directories: TF
    Serving's ``--model_base_path`` layout."""
    return (
        "://" not in model
        and os.path.isdir(model)
        and not os.path.isfile(os.path.join(model, "saved_model.pb"))
        and bool(versions_on_disk(model))
    )


def registry_for(
    model: str | None,
    *,
    model_name: str | None = None,
    config_file: str | None = None,
    policy: VersionPolicy | None = None,
    poll_seconds: float = 1.0,
    config_poll_seconds: float = 0.0,
    pool_options: dict[str, Any] | None = None,
) -> ModelRegistry | None:
    """The registry ``python -m pool serve`` runs: the models of ``config_file``, or the base
    path ``model`` (numbered version directories) under ``policy``; ``None`` for one SavedModel
    directory or TF Hub handle (served as it is, without polling). ``pool_options`` go to each
    version's :class:`pool.PredictionPool`; without ``workers``, each gets
    :func:`default_workers`. Raises :class:`~pool.serve.model_config.ConfigError` (a
    ``ValueError``) for a config file that does not parse."""
    from ..prediction_pool import PredictionPool
    from ..savedmodel_pb import check_signature
    from .model_config import read

    options = dict(pool_options or {})
    if config_file is not None:
        if model is not None:
            raise ValueError(
                f"expected either MODEL or --model_config_file, got both ({model!r}, "
                f"{config_file!r}); TF Serving ignores the model path then, this server refuses"
            )
        specs = read(config_file)
    elif model is not None and is_base_path(model):
        name = model_name or os.path.basename(os.path.abspath(model)) or "model"
        specs = [ModelSpec(name, model, policy or VersionPolicy())]
    else:
        return None
    signature = options.get("signature", "serving_default")
    registry: ModelRegistry

    def factory(path: str, spec: ModelSpec) -> Any:
        check_signature(path, signature, None)  # ModelLoadError before any worker starts
        kwargs = dict(options)
        if kwargs.get("workers") is None:
            kwargs["workers"] = default_workers(len(registry.names))
        return PredictionPool(path, **kwargs)

    # The options are checked now (a ValueError, before any worker starts): building a pool
    # starts nothing.
    workers = options.get("workers")
    PredictionPool(specs[0].base_path, **{**options, "workers": 1 if workers is None else workers})
    registry = ModelRegistry(
        specs,
        factory,
        poll_seconds=poll_seconds,
        config_file=config_file,
        config_poll_seconds=config_poll_seconds,
        signature_name=signature,
    )
    return registry
