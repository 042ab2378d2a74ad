"""The 13 FSRVP operations as frozen dataclasses, and their NDR stubs (MS-FSRVP section 6).

Each parameter's wire type is declared once, on its dataclass field; one generic reader and one
generic writer walk those declarations for requests, responses and the share mapping struct alike.
`OPERATIONS` ties every opnum to its request and response types.

Wire rules that matter here (C706 chapter 14, MS-RPCE 2.2.4):
- `[in, string] LPWSTR ShareName` is a top-level [ref] pointer: only the string is on the wire.
- `[out] T *x` is a [ref] pointer too: only x.  `[out, string] LPWSTR *OwnerMachineName` points
  to a unique pointer (pointer_default(unique)): a referent id (0 for NULL), then the string.
- GetShareMapping's `[out, switch_is(Level)]` union is non-encapsulated: its u32 discriminant
  (the Level), then for level 1 a unique pointer to FSSAGENT_SHARE_MAPPING_1, whose two string
  pointers' referents follow the struct.  Other levels have an empty arm: the discriminant alone.
- Every operation returns a DWORD HRESULT, marshalled after all [out] parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import uuid
from typing import Any, Mapping

from .constants import Opnum
from .ndr import DEFAULT_MAX_STRING_CHARS, NdrError, NdrReader, NdrWriter

NULL_GUID = uuid.UUID(int=0)
SHARE_MAPPING_LEVEL_1 = 1

_FILETIME_UNITS_PER_SECOND = 10_000_000
_FILETIME_OF_UNIX_EPOCH = 116_444_736_000_000_000  # 1970-01-01 in 100 ns units since 1601-01-01
_WIRE_TYPE = "ndr"
_RESULT = "result"


class UnknownOpnum(ValueError):
    """The opnum is not one of FileServerVssAgent's 0..12."""


# -- wire types -------------------------------------------------------------------------------
class _WireType:
    """How one parameter or struct member is represented.

    Reading and writing are split into the scalar part and the deferred part (the referents of
    embedded pointers), because a struct writes all its members' scalars before any referent.
    `siblings` are the values (or, inside a struct, the scalars) of the fields before this one.
    """

    empty: Any = None  # what this output holds in the response of a failed call

    def read(self, reader: NdrReader, what: str, siblings: Mapping[str, Any]) -> Any:
        return self.read_deferred(reader, what, self.read_scalar(reader, what, siblings))

    def write(self, writer: NdrWriter, what: str, value: Any, siblings: Mapping[str, Any]) -> None:
        self.write_scalar(writer, what, value, siblings)
        self.write_deferred(writer, what, value)

    def read_scalar(self, reader: NdrReader, what: str, siblings: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    def read_deferred(self, reader: NdrReader, what: str, scalar: Any) -> Any:
        return scalar

    def write_scalar(self, writer: NdrWriter, what: str, value: Any, siblings: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def write_deferred(self, writer: NdrWriter, what: str, value: Any) -> None:
        pass


class _Primitive(_WireType):
    """A value with no pointers, read and written by the NdrReader/NdrWriter method of that name."""

    def __init__(self, method: str, empty: Any) -> None:
        self.method = method
        self.empty = empty

    def read_scalar(self, reader, what, siblings):
        return getattr(reader, self.method)(what)

    def write_scalar(self, writer, what, value, siblings):
        getattr(writer, self.method)(value, what)


class _Unique(_WireType):
    """A unique pointer: a referent id in the scalars, the referent among the deferred data."""

    def __init__(self, target: _WireType, nullable: bool) -> None:
        self.target = target
        self.nullable = nullable

    def read_scalar(self, reader, what, siblings):
        present = reader.referent_id(what) != 0
        if not present and not self.nullable:
            raise NdrError(f"{what}: NULL where a value is required")
        return present

    def read_deferred(self, reader, what, scalar):
        return self.target.read(reader, what, {}) if scalar else None

    def write_scalar(self, writer, what, value, siblings):
        if value is None and not self.nullable:
            raise NdrError(f"{what}: None where a value is required")
        writer.referent_id(value is not None)

    def write_deferred(self, writer, what, value):
        if value is not None:
            self.target.write(writer, what, value, {})


class _Struct(_WireType):
    """A struct: aligned to its largest member, all members' scalars, then their referents."""

    def __init__(self, cls: type, alignment: int) -> None:
        self.cls = cls
        self.alignment = alignment

    def read_scalar(self, reader, what, siblings):
        reader.align(self.alignment)
        scalars: dict[str, Any] = {}
        for name, wire_type in _layout(self.cls):
            scalars[name] = wire_type.read_scalar(reader, f"{what}.{name}", scalars)
        return scalars

    def read_deferred(self, reader, what, scalar):
        return self.cls(**{name: wire_type.read_deferred(reader, f"{what}.{name}", scalar[name])
                           for name, wire_type in _layout(self.cls)})

    def write_scalar(self, writer, what, value, siblings):
        if not isinstance(value, self.cls):
            raise NdrError(f"{what}: {value!r} is not a {self.cls.__name__}")
        writer.align(self.alignment)
        members = _values(value)
        for name, wire_type in _layout(self.cls):
            wire_type.write_scalar(writer, f"{what}.{name}", members[name], members)

    def write_deferred(self, writer, what, value):
        for name, wire_type in _layout(self.cls):
            wire_type.write_deferred(writer, f"{what}.{name}", getattr(value, name))


class _Switch(_WireType):
    """The arm of a non-encapsulated union; its discriminant is the sibling field named here."""

    def __init__(self, discriminant: str, arms: Mapping[int, _WireType]) -> None:
        self.discriminant = discriminant
        self.arms = arms

    def read_scalar(self, reader, what, siblings):
        arm = self.arms.get(siblings[self.discriminant])
        return None if arm is None else arm.read(reader, what, siblings)

    def write_scalar(self, writer, what, value, siblings):
        arm = self.arms.get(siblings[self.discriminant])
        if arm is not None:
            arm.write(writer, what, value, siblings)
        elif value is not None:
            raise NdrError(f"{what}: {self.discriminant} {siblings[self.discriminant]} has no arm to carry a value")


U32 = _Primitive("u32", 0)
I32 = _Primitive("i32", 0)
BOOL32 = _Primitive("boolean32", False)
HYPER = _Primitive("u64", 0)
GUID = _Primitive("guid", NULL_GUID)
STRING = _Primitive("string", "")  # a [ref] string: top-level [in] parameters
UNIQUE_STRING = _Unique(STRING, nullable=True)
EMBEDDED_STRING = _Unique(STRING, nullable=False)  # a pointer member we require to be set


def _wire(wire_type: _WireType) -> Any:
    """Declares a dataclass field's wire type (the field stays required)."""
    return dataclasses.field(metadata={_WIRE_TYPE: wire_type})


@functools.cache
def _layout(cls: type) -> tuple[tuple[str, _WireType], ...]:
    """Fields in wire order: as declared, except that the HRESULT comes after the [out] parameters."""
    fields = [(f.name, f.metadata[_WIRE_TYPE]) for f in dataclasses.fields(cls)]
    return tuple(sorted(fields, key=lambda field: field[0] == _RESULT))


def _values(message: Any) -> dict[str, Any]:
    return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}


# -- messages ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShareMapping1:
    """FSSAGENT_SHARE_MAPPING_1: where a share's shadow copy is exposed."""

    set_id: uuid.UUID = _wire(GUID)
    copy_id: uuid.UUID = _wire(GUID)
    share_name_unc: str = _wire(EMBEDDED_STRING)
    shadow_copy_share_name: str = _wire(EMBEDDED_STRING)
    creation_timestamp: int = _wire(HYPER)  # FILETIME


# LONGLONG makes the struct 8-aligned (Samba's NTTIME is 4-aligned; at offset 8 both agree).
SHARE_MAPPING = _Switch("level", {SHARE_MAPPING_LEVEL_1: _Unique(_Struct(ShareMapping1, alignment=8), nullable=True)})


@dataclasses.dataclass(frozen=True)
class GetSupportedVersionRequest:
    """GetSupportedVersion has no inputs: an empty stub."""


@dataclasses.dataclass(frozen=True)
class SetContextRequest:
    """Opens a creation sequence: a CONTEXT_VALUES value, maybe with one recovery attribute."""

    context: int = _wire(U32)


@dataclasses.dataclass(frozen=True)
class StartShadowCopySetRequest:
    """Open a new set; the client's id is only remembered, the server picks the set id."""

    client_set_id: uuid.UUID = _wire(GUID)


@dataclasses.dataclass(frozen=True)
class AddToShadowCopySetRequest:
    """Add a share (a UNC) to a started set; Windows servers ignore the client's copy id."""

    client_copy_id: uuid.UUID = _wire(GUID)
    set_id: uuid.UUID = _wire(GUID)
    share_name: str = _wire(STRING)


@dataclasses.dataclass(frozen=True)
class _SetWithTimeoutRequest:
    set_id: uuid.UUID = _wire(GUID)
    timeout_ms: int = _wire(U32)


class CommitShadowCopySetRequest(_SetWithTimeoutRequest):
    """Take the snapshots of a prepared set, within timeout_ms."""


class ExposeShadowCopySetRequest(_SetWithTimeoutRequest):
    """Share the committed snapshots, within timeout_ms."""


class PrepareShadowCopySetRequest(_SetWithTimeoutRequest):
    """Make sure the set is ready to commit, within timeout_ms."""


@dataclasses.dataclass(frozen=True)
class _SetRequest:
    set_id: uuid.UUID = _wire(GUID)


class RecoveryCompleteShadowCopySetRequest(_SetRequest):
    """The client's writers are done: the copies become read-only."""


class AbortShadowCopySetRequest(_SetRequest):
    """Drop a set that is not yet committed."""


@dataclasses.dataclass(frozen=True)
class _ShareRequest:
    share_name: str = _wire(STRING)


class IsPathSupportedRequest(_ShareRequest):
    """Can this server shadow-copy the share (a UNC)?"""


class IsPathShadowCopiedRequest(_ShareRequest):
    """Does the share (a UNC) already have a shadow copy?"""


@dataclasses.dataclass(frozen=True)
class GetShareMappingRequest:
    """Where an exposed copy of the share is; only level 1 exists."""

    copy_id: uuid.UUID = _wire(GUID)  # the IDL puts the copy before the set here, unlike Delete
    set_id: uuid.UUID = _wire(GUID)
    share_name: str = _wire(STRING)
    level: int = _wire(U32)


@dataclasses.dataclass(frozen=True)
class DeleteShareMappingRequest:
    """Unexpose one share's copy, and delete the snapshot when no other share uses it."""

    set_id: uuid.UUID = _wire(GUID)
    copy_id: uuid.UUID = _wire(GUID)
    share_name: str = _wire(STRING)


@dataclasses.dataclass(frozen=True)
class StatusResponse:
    """The response of the operations whose only output is the HRESULT."""

    result: int = _wire(U32)


@dataclasses.dataclass(frozen=True)
class GetSupportedVersionResponse:
    result: int = _wire(U32)
    min_version: int = _wire(U32)
    max_version: int = _wire(U32)


@dataclasses.dataclass(frozen=True)
class StartShadowCopySetResponse:
    result: int = _wire(U32)
    set_id: uuid.UUID = _wire(GUID)


@dataclasses.dataclass(frozen=True)
class AddToShadowCopySetResponse:
    result: int = _wire(U32)
    copy_id: uuid.UUID = _wire(GUID)


@dataclasses.dataclass(frozen=True)
class IsPathSupportedResponse:
    result: int = _wire(U32)
    supported: bool = _wire(BOOL32)
    owner_machine_name: str | None = _wire(UNIQUE_STRING)


@dataclasses.dataclass(frozen=True)
class IsPathShadowCopiedResponse:
    result: int = _wire(U32)
    present: bool = _wire(BOOL32)
    compatibility: int = _wire(I32)  # SHADOW_COPY_COMPATIBILITY_VALUES bits


@dataclasses.dataclass(frozen=True)
class GetShareMappingResponse:
    result: int = _wire(U32)
    level: int = _wire(U32)  # the union's discriminant; Windows and Samba echo the request's Level
    mapping: ShareMapping1 | None = _wire(SHARE_MAPPING)


@dataclasses.dataclass(frozen=True)
class Operation:
    opnum: Opnum
    request: type
    response: type


OPERATIONS: dict[int, Operation] = {op.opnum: op for op in (
    Operation(Opnum.GetSupportedVersion, GetSupportedVersionRequest, GetSupportedVersionResponse),
    Operation(Opnum.SetContext, SetContextRequest, StatusResponse),
    Operation(Opnum.StartShadowCopySet, StartShadowCopySetRequest, StartShadowCopySetResponse),
    Operation(Opnum.AddToShadowCopySet, AddToShadowCopySetRequest, AddToShadowCopySetResponse),
    Operation(Opnum.CommitShadowCopySet, CommitShadowCopySetRequest, StatusResponse),
    Operation(Opnum.ExposeShadowCopySet, ExposeShadowCopySetRequest, StatusResponse),
    Operation(Opnum.RecoveryCompleteShadowCopySet, RecoveryCompleteShadowCopySetRequest, StatusResponse),
    Operation(Opnum.AbortShadowCopySet, AbortShadowCopySetRequest, StatusResponse),
    Operation(Opnum.IsPathSupported, IsPathSupportedRequest, IsPathSupportedResponse),
    Operation(Opnum.IsPathShadowCopied, IsPathShadowCopiedRequest, IsPathShadowCopiedResponse),
    Operation(Opnum.GetShareMapping, GetShareMappingRequest, GetShareMappingResponse),
    Operation(Opnum.DeleteShareMapping, DeleteShareMappingRequest, StatusResponse),
    Operation(Opnum.PrepareShadowCopySet, PrepareShadowCopySetRequest, StatusResponse),
)}
_OPERATION_OF_REQUEST = {op.request: op for op in OPERATIONS.values()}


def _operation(opnum: int) -> Operation:
    try:
        return OPERATIONS[opnum]
    except (KeyError, TypeError):
        raise UnknownOpnum(f"opnum {opnum!r} is not an FSRVP operation") from None


def _decode(cls: type, stub: bytes, max_string_chars: int = DEFAULT_MAX_STRING_CHARS) -> Any:
    reader = NdrReader(stub, max_string_chars)
    values: dict[str, Any] = {}
    for name, wire_type in _layout(cls):
        values[name] = wire_type.read(reader, name, values)
    return cls(**values)


def _encode(message: Any) -> bytes:
    writer = NdrWriter()
    values = _values(message)
    for name, wire_type in _layout(type(message)):
        wire_type.write(writer, name, values[name], values)
    return writer.getvalue()


# -- public API -------------------------------------------------------------------------------
def decode_request(opnum: int, stub: bytes, max_string_chars: int = DEFAULT_MAX_STRING_CHARS) -> Any:
    """The request dataclass of `opnum`; NdrError if the stub does not hold one, trailing bytes ignored.

    A string longer than `max_string_chars` UTF-16 units (NUL included) is an NdrError too."""
    return _decode(_operation(opnum).request, stub, max_string_chars)


def encode_response(opnum: int, response: Any) -> bytes:
    expected = _operation(opnum).response
    if type(response) is not expected:
        raise TypeError(f"opnum {opnum} answers with {expected.__name__}, not {type(response).__name__}")
    return _encode(response)


def encode_request(request: Any) -> tuple[int, bytes]:
    """Client side: the opnum and stub of a request dataclass."""
    try:
        operation = _OPERATION_OF_REQUEST[type(request)]
    except KeyError:
        raise TypeError(f"{type(request).__name__} is not an FSRVP request") from None
    return int(operation.opnum), _encode(request)


def decode_response(opnum: int, stub: bytes) -> Any:
    """Client side: the response dataclass of `opnum`; NdrError if the stub does not hold one."""
    return _decode(_operation(opnum).response, stub)


def failure_response(request: Any, result: int) -> Any:
    """The response to `request` carrying `result` and empty outputs (NULL GUID, FALSE, NULL pointer).

    A response field named like a request field echoes it: GetShareMapping's out union is
    switch_is(Level), so its discriminant is the request's level (as Samba sends it).  For the
    operations whose only output is the HRESULT this is the whole answer, success included.
    """
    operation = _OPERATION_OF_REQUEST[type(request)]
    inputs = _values(request)
    outputs = {name: inputs.get(name, wire_type.empty) for name, wire_type in _layout(operation.response)}
    outputs[_RESULT] = result
    return operation.response(**outputs)


def filetime_from_unix(seconds: float) -> int:
    """FILETIME (100 ns units since 1601-01-01 UTC) of a Unix time, whole seconds kept exact."""
    whole = math.floor(seconds)
    filetime = (_FILETIME_OF_UNIX_EPOCH + whole * _FILETIME_UNITS_PER_SECOND
                + round((seconds - whole) * _FILETIME_UNITS_PER_SECOND))
    if not 0 <= filetime < 1 << 64:
        raise ValueError(f"Unix time {seconds} is outside the FILETIME range")
    return filetime


def unix_from_filetime(filetime: int) -> float:
    return (filetime - _FILETIME_OF_UNIX_EPOCH) / _FILETIME_UNITS_PER_SECOND
