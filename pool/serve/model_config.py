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

from google.protobuf import text_format

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


_POLICY = f".{_PACKAGE}.ServableVersionPolicy"
#: TF Serving's ``ModelServerConfig`` (``model_server_config.proto``, and the version policy of
#: ``file_system_storage_path_source.proto``), the fields this server reads, in the tables of
#: :func:`pool.serve.grpc_protos.build_pool`: any other field is a parse error naming it.
_CONFIG_PROTO: dict[str, tuple] = {
    "pool/serve/tfs_model_server_config.proto": (
        _PACKAGE,
        [],
        [
            (
                "ServableVersionPolicy",
                [
                    ("latest", 100, f"{_POLICY}.Latest", "oneof:policy_choice"),
                    ("all", 101, f"{_POLICY}.All", "oneof:policy_choice"),
                    ("specific", 102, f"{_POLICY}.Specific", "oneof:policy_choice"),
                ],
                [
                    ("Latest", [("num_versions", 1, "uint32", "")], []),
                    ("All", [], []),
                    ("Specific", [("versions", 1, "int64", "repeated")], []),
                ],
            ),
            (
                "ModelConfig",
                [
                    ("name", 1, "string", ""),
                    ("base_path", 2, "string", ""),
                    ("model_platform", 4, "string", ""),
                    ("model_version_policy", 7, _POLICY, ""),
                    ("version_labels", 8, "map<string,int64>", ""),
                ],
                [],
            ),
            ("ModelConfigList", [("config", 1, f".{_PACKAGE}.ModelConfig", "repeated")], []),
            (
                "ModelServerConfig",
                [("model_config_list", 1, f".{_PACKAGE}.ModelConfigList", "oneof:config")],
                [],
            ),
        ],
        {},
    )
}


@lru_cache(maxsize=1)
def _message_class() -> Any:
    """The ``ModelServerConfig`` message class, from the descriptors above (no TensorFlow)."""
    from .grpc_protos import build_pool, message_class

    pool = build_pool(_CONFIG_PROTO, imports=())
    return message_class(pool, f"{_PACKAGE}.ModelServerConfig")


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
