"""TensorFlow Serving's gRPC messages, without TensorFlow.

``tensorflow_serving.apis.predict_pb2`` and its siblings import ``tensorflow`` (their
``TensorProto`` lives in TensorFlow's package): 700 MB and 3.5 s in the server process, which
never runs a model itself. This module describes the subset of the messages the server reads
and writes, builds their descriptors at import time with ``protobuf`` alone, and makes the
message classes from a *private* :class:`~google.protobuf.descriptor_pool.DescriptorPool`, so
that a process which has also loaded TensorFlow's own generated modules (a test, a notebook
mounting the server) gets no duplicate-symbol clash.

Wire compatibility is what matters, and it holds by construction: every message has TF
Serving's full name (``tensorflow.serving.PredictRequest``...), and every field kept has its
name, number and type (``tests/test_serve_grpc.py`` compares each one with the descriptors of
the installed ``tensorflow-serving-api``). Fields the server never reads are left out (e.g.
``TensorProto.resource_handle_val``, ``TensorInfo.coo_sparse``, ``PredictRequest.client_id``):
a client that sends them is answered as if they were absent (protobuf skips unknown fields).

The definitions follow ``tensorflow_serving/apis/{model,predict,get_model_metadata,
get_model_status}.proto``, ``tensorflow_serving/util/status.proto`` and TensorFlow's
``core/framework/{tensor,tensor_shape,types}.proto``, ``core/protobuf/{meta_graph,
error_codes}.proto`` (Copyright The TensorFlow Authors, Apache License 2.0).
"""

from __future__ import annotations

from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

_F = descriptor_pb2.FieldDescriptorProto

#: protobuf scalar types by the names used below.
_SCALARS = {
    "double": _F.TYPE_DOUBLE,
    "float": _F.TYPE_FLOAT,
    "int64": _F.TYPE_INT64,
    "uint64": _F.TYPE_UINT64,
    "int32": _F.TYPE_INT32,
    "uint32": _F.TYPE_UINT32,
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}

#: tensorflow.DataType (types.proto): the values this server knows by name. The enum is open
#: (proto3): other values travel as numbers and are refused as unsupported dtypes.
DATA_TYPES = {
    "DT_INVALID": 0,
    "DT_FLOAT": 1,
    "DT_DOUBLE": 2,
    "DT_INT32": 3,
    "DT_UINT8": 4,
    "DT_INT16": 5,
    "DT_INT8": 6,
    "DT_STRING": 7,
    "DT_COMPLEX64": 8,
    "DT_INT64": 9,
    "DT_BOOL": 10,
    "DT_QINT8": 11,
    "DT_QUINT8": 12,
    "DT_QINT32": 13,
    "DT_BFLOAT16": 14,
    "DT_QINT16": 15,
    "DT_QUINT16": 16,
    "DT_UINT16": 17,
    "DT_COMPLEX128": 18,
    "DT_HALF": 19,
    "DT_RESOURCE": 20,
    "DT_VARIANT": 21,
    "DT_UINT32": 22,
    "DT_UINT64": 23,
}

#: tensorflow.error.Code (error_codes.proto), which is also gRPC's status code numbering.
ERROR_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}

#: tensorflow.serving.ModelVersionStatus.State
MODEL_STATES = {
    "UNKNOWN": 0,
    "START": 10,
    "LOADING": 20,
    "AVAILABLE": 30,
    "UNLOADING": 40,
    "END": 50,
}

#: A field: (name, number, type, options). ``type`` is a scalar name, ``.full.MessageName``,
#: ``enum:.full.EnumName`` or ``map<string,TYPE>``; options: "repeated", "oneof:NAME".
_Field = tuple

#: file name -> (package, dependencies, messages, enums); a message is
#: (name, [fields], [nested messages]).
_FILES: dict[str, tuple[str, list[str], list[tuple], dict[str, dict[str, int]]]] = {
    "pool/tensorflow/error_codes.proto": ("tensorflow.error", [], [], {"Code": ERROR_CODES}),
    "pool/tensorflow/tensor.proto": (
        "tensorflow",
        [],
        [
            (
                "TensorShapeProto",
                [
                    ("dim", 2, ".tensorflow.TensorShapeProto.Dim", "repeated"),
                    ("unknown_rank", 3, "bool", ""),
                ],
                [("Dim", [("size", 1, "int64", ""), ("name", 2, "string", "")], [])],
            ),
            (
                "TensorProto",
                [
                    ("dtype", 1, "enum:.tensorflow.DataType", ""),
                    ("tensor_shape", 2, ".tensorflow.TensorShapeProto", ""),
                    ("version_number", 3, "int32", ""),
                    ("tensor_content", 4, "bytes", ""),
                    ("half_val", 13, "int32", "repeated"),
                    ("float_val", 5, "float", "repeated"),
                    ("double_val", 6, "double", "repeated"),
                    ("int_val", 7, "int32", "repeated"),
                    ("string_val", 8, "bytes", "repeated"),
                    ("scomplex_val", 9, "float", "repeated"),
                    ("int64_val", 10, "int64", "repeated"),
                    ("bool_val", 11, "bool", "repeated"),
                    ("dcomplex_val", 12, "double", "repeated"),
                    ("uint32_val", 16, "uint32", "repeated"),
                    ("uint64_val", 17, "uint64", "repeated"),
                ],
                [],
            ),
            (
                "TensorInfo",
                [
                    ("name", 1, "string", "oneof:encoding"),
                    ("dtype", 2, "enum:.tensorflow.DataType", ""),
                    ("tensor_shape", 3, ".tensorflow.TensorShapeProto", ""),
                ],
                [],
            ),
            (
                "SignatureDef",
                [
                    ("inputs", 1, "map<string,.tensorflow.TensorInfo>", ""),
                    ("outputs", 2, "map<string,.tensorflow.TensorInfo>", ""),
                    ("method_name", 3, "string", ""),
                    ("defaults", 4, "map<string,.tensorflow.TensorProto>", ""),
                ],
                [],
            ),
        ],
        {"DataType": DATA_TYPES},
    ),
    "pool/tensorflow_serving/apis.proto": (
        "tensorflow.serving",
        [
            "google/protobuf/any.proto",
            "google/protobuf/wrappers.proto",
            "pool/tensorflow/error_codes.proto",
            "pool/tensorflow/tensor.proto",
        ],
        [
            (
                "ModelSpec",
                [
                    ("name", 1, "string", ""),
                    ("version", 2, ".google.protobuf.Int64Value", "oneof:version_choice"),
                    ("version_label", 4, "string", "oneof:version_choice"),
                    ("signature_name", 3, "string", ""),
                ],
                [],
            ),
            (
                "PredictRequest",
                [
                    ("model_spec", 1, ".tensorflow.serving.ModelSpec", ""),
                    ("inputs", 2, "map<string,.tensorflow.TensorProto>", ""),
                    ("output_filter", 3, "string", "repeated"),
                ],
                [],
            ),
            (
                "PredictResponse",
                [
                    ("model_spec", 2, ".tensorflow.serving.ModelSpec", ""),
                    ("outputs", 1, "map<string,.tensorflow.TensorProto>", ""),
                ],
                [],
            ),
            (
                "SignatureDefMap",
                [("signature_def", 1, "map<string,.tensorflow.SignatureDef>", "")],
                [],
            ),
            (
                "GetModelMetadataRequest",
                [
                    ("model_spec", 1, ".tensorflow.serving.ModelSpec", ""),
                    ("metadata_field", 2, "string", "repeated"),
                ],
                [],
            ),
            (
                "GetModelMetadataResponse",
                [
                    ("model_spec", 1, ".tensorflow.serving.ModelSpec", ""),
                    ("metadata", 2, "map<string,.google.protobuf.Any>", ""),
                ],
                [],
            ),
            (
                "StatusProto",
                [
                    ("error_code", 1, "enum:.tensorflow.error.Code", ""),
                    ("error_message", 2, "string", ""),
                ],
                [],
            ),
            (
                "ModelVersionStatus",
                [
                    ("version", 1, "int64", ""),
                    ("state", 2, "enum:.tensorflow.serving.ModelVersionStatus.State", ""),
                    ("status", 3, ".tensorflow.serving.StatusProto", ""),
                ],
                [],
            ),
            (
                "GetModelStatusRequest",
                [("model_spec", 1, ".tensorflow.serving.ModelSpec", "")],
                [],
            ),
            (
                "GetModelStatusResponse",
                [
                    (
                        "model_version_status",
                        1,
                        ".tensorflow.serving.ModelVersionStatus",
                        "repeated",
                    )
                ],
                [],
            ),
        ],
        {},
    ),
}

#: Enums nested in a message: (message, enum name, values).
_NESTED_ENUMS = {"ModelVersionStatus": ("State", MODEL_STATES)}


def _message(
    name: str, fields: list[_Field], nested: list[tuple], package: str
) -> descriptor_pb2.DescriptorProto:
    out = descriptor_pb2.DescriptorProto(name=name)
    oneofs: list[str] = []
    for sub_name, sub_fields, sub_nested in nested:
        out.nested_type.append(_message(sub_name, sub_fields, sub_nested, package))
    if name in _NESTED_ENUMS:
        enum_name, values = _NESTED_ENUMS[name]
        out.enum_type.append(_enum(enum_name, values))
    for field_name, number, kind, option in fields:
        field = out.field.add(name=field_name, number=number, json_name=_camel(field_name))
        field.label = _F.LABEL_REPEATED if option == "repeated" else _F.LABEL_OPTIONAL
        if kind.startswith("map<"):
            key, value = kind[4:-1].split(",")
            entry = "".join(p.title() for p in field_name.split("_")) + "Entry"
            message = out.nested_type.add(name=entry)
            message.options.map_entry = True
            for i, (part_name, part) in enumerate((("key", key), ("value", value)), 1):
                part_field = message.field.add(name=part_name, number=i, json_name=part_name)
                part_field.label = _F.LABEL_OPTIONAL
                _set_type(part_field, part)
            field.label = _F.LABEL_REPEATED
            field.type = _F.TYPE_MESSAGE
            field.type_name = f".{package}.{name}.{entry}"
        else:
            _set_type(field, kind)
        if option.startswith("oneof:"):
            oneof = option.split(":", 1)[1]
            if oneof not in oneofs:
                oneofs.append(oneof)
                out.oneof_decl.add(name=oneof)
            field.oneof_index = oneofs.index(oneof)
    return out


def _set_type(field: descriptor_pb2.FieldDescriptorProto, kind: str) -> None:
    if kind in _SCALARS:
        field.type = _SCALARS[kind]
    elif kind.startswith("enum:"):
        field.type = _F.TYPE_ENUM
        field.type_name = kind[5:]
    else:
        field.type = _F.TYPE_MESSAGE
        field.type_name = kind


def _enum(name: str, values: dict[str, int]) -> descriptor_pb2.EnumDescriptorProto:
    out = descriptor_pb2.EnumDescriptorProto(name=name)
    for value_name, number in values.items():
        out.value.add(name=value_name, number=number)
    return out


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(p.title() for p in rest)


def build_pool(
    files: dict[str, tuple], imports: tuple[Any, ...] = (any_pb2, wrappers_pb2)
) -> descriptor_pool.DescriptorPool:
    """A private descriptor pool holding ``files`` (file name -> ``(package, dependencies,
    messages, enums)``, described as ``_FILES`` is) and the well-known ``imports`` (generated
    ``*_pb2`` modules of protobuf itself) they depend on."""
    pool = descriptor_pool.DescriptorPool()
    for module in imports:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    for file_name, (package, dependencies, messages, enums) in files.items():
        proto = descriptor_pb2.FileDescriptorProto(
            name=file_name, package=package, syntax="proto3", dependency=dependencies
        )
        for enum_name, values in enums.items():
            proto.enum_type.append(_enum(enum_name, values))
        for name, fields, nested in messages:
            proto.message_type.append(_message(name, fields, nested, package))
        pool.Add(proto)
    return pool


def message_class(pool: descriptor_pool.DescriptorPool, full_name: str) -> Any:
    """The message class of ``full_name`` in ``pool``."""
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


#: The private descriptor pool holding the messages below (and google.protobuf.Any and
#: Int64Value, on which they depend).
POOL = build_pool(_FILES)


def _class(full_name: str) -> Any:
    return message_class(POOL, full_name)


TensorProto = _class("tensorflow.TensorProto")
TensorShapeProto = _class("tensorflow.TensorShapeProto")
TensorInfo = _class("tensorflow.TensorInfo")
SignatureDef = _class("tensorflow.SignatureDef")
ModelSpec = _class("tensorflow.serving.ModelSpec")
PredictRequest = _class("tensorflow.serving.PredictRequest")
PredictResponse = _class("tensorflow.serving.PredictResponse")
SignatureDefMap = _class("tensorflow.serving.SignatureDefMap")
GetModelMetadataRequest = _class("tensorflow.serving.GetModelMetadataRequest")
GetModelMetadataResponse = _class("tensorflow.serving.GetModelMetadataResponse")
GetModelStatusRequest = _class("tensorflow.serving.GetModelStatusRequest")
GetModelStatusResponse = _class("tensorflow.serving.GetModelStatusResponse")
ModelVersionStatus = _class("tensorflow.serving.ModelVersionStatus")
StatusProto = _class("tensorflow.serving.StatusProto")

#: Every message class above by its full name (the wire compatibility test walks them).
MESSAGES = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        TensorProto,
        TensorShapeProto,
        TensorInfo,
        SignatureDef,
        ModelSpec,
        PredictRequest,
        PredictResponse,
        SignatureDefMap,
        GetModelMetadataRequest,
        GetModelMetadataResponse,
        GetModelStatusRequest,
        GetModelStatusResponse,
        ModelVersionStatus,
        StatusProto,
    )
}

#: ``Any.type_url`` of the ``signature_def`` metadata, as TF Serving writes it.
SIGNATURE_DEF_MAP_URL = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
