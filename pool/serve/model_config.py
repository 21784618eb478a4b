"""TensorFlow Serving's model config file (``--model_config_file``), read without TensorFlow.

The file is a ``ModelServerConfig`` in protobuf text format holding a ``model_config_list``::

    model_config_list {
      config {
        name: "resnet"
        base_path: "/models/resnet"
        model_platform: "tensorflow"
        model_version_policy { latest { num_versions: 2 } }   # or all {} / specific { versions: 1 }
        version_labels { key: "stable" value: 1 }
        version_labels { key: "canary" value: 2 }
      }
      config { name: "text" base_path: "/models/text" }
    }

It is parsed by ``google.protobuf.text_format`` against descriptors built here, field numbers
and all, from TF Serving's ``model_server_config.proto`` and
``file_system_storage_path_source.proto``: importing ``tensorflow_serving``'s generated modules
would import all of TensorFlow into the server process, which must stay TF-free (its workers
are forked). Only the fields this server acts on are declared; any other field (``logging_config``,
``custom_model_config``, the deprecated ``model_type``) is a :class:`ConfigError` naming it, so a
setting is never silently ignored. ``model_platform`` is ``tensorflow`` (or empty); the
``--runtime`` option picks what runs the model in the workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    message_factory,
    text_format,
)

#: ``model_platform`` values this server accepts.
PLATFORMS = ("", "tensorflow")

_PACKAGE = "pool.serve.tfs"  # a package of our own: no clash with a tensorflow_serving import


class ConfigError(ValueError):
    """The model config file cannot be read, or says something this server cannot do."""


@dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's ``ServableVersionPolicy``: ``latest`` (the ``num_versions`` highest),
    ``all``, or ``specific`` (exactly ``versions``)."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of the ``available`` (complete) ones on disk."""
        if self.kind == "all":
            return sorted(available)
        if self.kind == "specific":
            return sorted(set(available) & set(self.versions))
        return sorted(available)[-self.num_versions :] if available else []

    def describe(self) -> str:
        if self.kind == "all":
            return "all"
        if self.kind == "specific":
            return "specific " + ",".join(str(v) for v in self.versions)
        return f"latest {self.num_versions}"


@dataclass(frozen=True)
class ModelSpec:
    """One ``config { ... }`` entry: a model served under ``name`` from ``base_path``."""

    name: str
    base_path: str
    policy: VersionPolicy = VersionPolicy()
    labels: dict[str, int] = field(default_factory=dict)
    platform: str = "tensorflow"


def parse_policy(text: str) -> VersionPolicy:
    """The command line's ``--model-version-policy``: ``latest``, ``latest:N``, ``all`` or
    ``specific:1,2``."""
    kind, _, arg = text.strip().partition(":")
    kind = kind.lower()
    try:
        if kind == "latest":
            n = int(arg) if arg else 1
            if n < 1:
                raise ValueError
            return VersionPolicy("latest", n)
        if kind == "all" and not arg:
            return VersionPolicy("all")
        if kind == "specific":
            versions = tuple(sorted({int(v) for v in arg.split(",") if v.strip()}))
            if not versions or min(versions) < 0:
                raise ValueError
            return VersionPolicy("specific", versions=versions)
    except ValueError:
        pass
    raise ValueError(
        f"expected a version policy latest, latest:N (N >= 1), all or specific:V1,V2..., "
        f"got {text!r}"
    )


@lru_cache(maxsize=1)
def _message_class() -> Any:
    """The ``ModelServerConfig`` message class, built from hand-written descriptors."""
    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="pool/serve/tfs_model_server_config.proto", package=_PACKAGE, syntax="proto3"
    )

    def message(parent: Any, name: str) -> Any:
        nested = parent.message_type if parent is proto else parent.nested_type
        return nested.add(name=name)

    def add(
        m: Any,
        name: str,
        number: int,
        kind: int,
        type_name: str = "",
        repeated: bool = False,
        oneof: int | None = None,
    ) -> None:
        fd = m.field.add(name=name, number=number, type=kind)
        fd.label = f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL
        if type_name:
            fd.type_name = type_name
        if oneof is not None:
            fd.oneof_index = oneof

    policy = message(proto, "ServableVersionPolicy")  # FileSystemStoragePathSourceConfig's
    latest = message(policy, "Latest")
    add(latest, "num_versions", 1, f.TYPE_UINT32)
    message(policy, "All")
    specific = message(policy, "Specific")
    add(specific, "versions", 1, f.TYPE_INT64, repeated=True)
    policy.oneof_decl.add(name="policy_choice")
    p = f".{_PACKAGE}.ServableVersionPolicy"
    add(policy, "latest", 100, f.TYPE_MESSAGE, f"{p}.Latest", oneof=0)
    add(policy, "all", 101, f.TYPE_MESSAGE, f"{p}.All", oneof=0)
    add(policy, "specific", 102, f.TYPE_MESSAGE, f"{p}.Specific", oneof=0)

    config = message(proto, "ModelConfig")
    labels = message(config, "VersionLabelsEntry")
    labels.options.map_entry = True
    add(labels, "key", 1, f.TYPE_STRING)
    add(labels, "value", 2, f.TYPE_INT64)
    add(config, "name", 1, f.TYPE_STRING)
    add(config, "base_path", 2, f.TYPE_STRING)
    add(config, "model_platform", 4, f.TYPE_STRING)
    add(config, "model_version_policy", 7, f.TYPE_MESSAGE, p)
    entry = f".{_PACKAGE}.ModelConfig.VersionLabelsEntry"
    add(config, "version_labels", 8, f.TYPE_MESSAGE, entry, repeated=True)

    listing = message(proto, "ModelConfigList")
    add(listing, "config", 1, f.TYPE_MESSAGE, f".{_PACKAGE}.ModelConfig", repeated=True)
    server = message(proto, "ModelServerConfig")
    server.oneof_decl.add(name="config")
    add(server, "model_config_list", 1, f.TYPE_MESSAGE, f".{_PACKAGE}.ModelConfigList", oneof=0)

    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{_PACKAGE}.ModelServerConfig")
    )


def parse(text: str, where: str = "model config") -> list[ModelSpec]:
    """The models of a ``ModelServerConfig`` text proto; :class:`ConfigError` for anything
    malformed, unknown or contradictory (a duplicate name, a relative path...)."""
    cls = _message_class()
    message = cls()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        raise ConfigError(
            f"{where}: expected TF Serving's model_config_list text format (fields: name, "
            f"base_path, model_platform, model_version_policy, version_labels): {exc}"
        ) from None
    specs: list[ModelSpec] = []
    for i, config in enumerate(message.model_config_list.config):
        at = f"{where}: config #{i + 1}"
        if not config.name or any(c in config.name for c in "/: \t"):
            raise ConfigError(
                f"{at}: expected a name without '/', ':' or spaces, got {config.name!r}"
            )
        if not config.base_path:
            raise ConfigError(f"{at} ({config.name}): base_path is missing")
        if config.model_platform not in PLATFORMS:
            raise ConfigError(
                f'{at} ({config.name}): expected model_platform "tensorflow", got '
                f"{config.model_platform!r} (--runtime picks openvino/onnxruntime)"
            )
        if any(s.name == config.name for s in specs):
            raise ConfigError(f"{at}: model name {config.name!r} appears twice")
        specs.append(
            ModelSpec(
                name=config.name,
                base_path=config.base_path,
                policy=_policy(config.model_version_policy, at),
                labels=dict(config.version_labels),
                platform="tensorflow",
            )
        )
    if not specs:
        raise ConfigError(f"{where}: expected a model_config_list with at least one config")
    return specs


def _policy(message: Any, at: str) -> VersionPolicy:
    choice = message.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy("all")
    if choice == "specific":
        versions = tuple(sorted(set(message.specific.versions)))
        if not versions:
            raise ConfigError(f"{at}: model_version_policy specific {{}} lists no versions")
        return VersionPolicy("specific", versions=versions)
    if choice == "latest":
        return VersionPolicy("latest", max(1, message.latest.num_versions))
    return VersionPolicy()  # TF Serving's default: the latest version


def read(path: str) -> list[ModelSpec]:
    """Parse the config file at ``path`` (relative base paths are relative to the working
    directory, as in TF Serving)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        reason = exc.strerror or exc
        raise ConfigError(f"cannot read model config file {path!r}: {reason}") from None
    return parse(text, f"model config file {path}")
