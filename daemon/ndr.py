"""NDR 2.0 marshalling primitives (C706 chapter 14, little-endian, 32-bit), sans-I/O.

Only what MS-FSRVP needs: aligned integers, GUIDs, FILETIMEs, conformant-varying UTF-16 strings
(`[string] wchar_t *`) and unique pointers.  Offsets and alignment are relative to the start of
the stub, as NDR defines them.

Decoding is strict where a lax reading could let two parties see different values, and lenient
where NDR itself is: every problem raises `NdrError` and nothing else, so a server can turn any
undecodable stub into one fault.

Decisions where C706 leaves room:
- Trailing bytes after the last parameter are ignored: NDR does not forbid them, Samba's server
  only warns about them, and some clients pad stubs or send extra (Samba's own IDL has an
  undocumented 52-byte `magic` input on two FSRVP calls).  `NdrReader.remaining` exposes them.
- Padding bytes are not checked to be zero (C706 leaves their value unspecified).
- A string must carry exactly one NUL, as its last unit: an embedded NUL would make the C view of
  the string (what Windows and Samba use) differ from ours.  Lone surrogates are refused.
- A string's max_count is capped at `max_string_chars` UTF-16 units (NUL included) before any
  data is read, so a forged count cannot make us slice or allocate for it.
"""

from __future__ import annotations

import struct
import uuid

DEFAULT_MAX_STRING_CHARS = 8192
FIRST_REFERENT_ID = 0x00020000  # what MIDL and pidl start unique pointer ids with
REFERENT_ID_STEP = 4

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_UTF16_NUL = b"\x00\x00"


class NdrError(ValueError):
    """The bytes are not a valid NDR representation of what was asked for (or cannot be made one)."""


class NdrReader:
    """Reads NDR primitives from one stub, front to back."""

    def __init__(self, data: bytes, max_string_chars: int = DEFAULT_MAX_STRING_CHARS) -> None:
        self._data = bytes(data)
        self._offset = 0
        self.max_string_chars = max_string_chars

    @property
    def remaining(self) -> int:
        """Bytes not consumed yet; decoders ignore them (see the module docstring)."""
        return len(self._data) - self._offset

    def align(self, boundary: int) -> None:
        self._take(-self._offset % boundary, "alignment padding")

    def _take(self, size: int, what: str) -> bytes:
        end = self._offset + size
        if end > len(self._data):
            raise NdrError(f"truncated: {what} needs {size} bytes at offset {self._offset}, "
                           f"{len(self._data) - self._offset} left")
        chunk = self._data[self._offset:end]
        self._offset = end
        return chunk

    def _unpack(self, layout: struct.Struct, what: str) -> int:
        self.align(layout.size)
        return layout.unpack(self._take(layout.size, what))[0]

    def u16(self, what: str = "uint16") -> int:
        return self._unpack(_U16, what)

    def u32(self, what: str = "uint32") -> int:
        return self._unpack(_U32, what)

    def i32(self, what: str = "int32") -> int:
        return self._unpack(_I32, what)

    def u64(self, what: str = "hyper") -> int:
        """An 8-aligned hyper, e.g. a FILETIME (100 ns units since 1601-01-01 UTC)."""
        return self._unpack(_U64, what)

    def boolean32(self, what: str = "BOOL") -> bool:
        """A 32-bit BOOL; any non-zero value is TRUE, as in C."""
        return self.u32(what) != 0

    def guid(self, what: str = "GUID") -> uuid.UUID:
        """A GUID struct {u32, u16, u16, u8[8]}: 4-aligned, the first three fields little-endian."""
        self.align(4)
        return uuid.UUID(bytes_le=self._take(16, what))

    def referent_id(self, what: str = "pointer") -> int:
        """A unique pointer's referent id; 0 is NULL, anything else means the referent follows."""
        return self.u32(what)

    def string(self, what: str = "string") -> str:
        """A conformant-varying, NUL-terminated UTF-16 string ([string] wchar_t *)."""
        max_count = self.u32(f"{what} max_count")
        offset = self.u32(f"{what} offset")
        actual_count = self.u32(f"{what} actual_count")
        if max_count > self.max_string_chars:
            raise NdrError(f"{what}: max_count {max_count} exceeds the limit of {self.max_string_chars}")
        if offset != 0:
            raise NdrError(f"{what}: offset {offset}, a [string] starts at 0")
        if actual_count > max_count:
            raise NdrError(f"{what}: actual_count {actual_count} exceeds max_count {max_count}")
        if actual_count == 0:
            raise NdrError(f"{what}: empty, not even the terminating NUL")
        units = self._take(2 * actual_count, what)
        if units[-2:] != _UTF16_NUL:
            raise NdrError(f"{what}: not NUL-terminated")
        try:
            text = units[:-2].decode("utf-16-le")
        except UnicodeDecodeError as exc:
            raise NdrError(f"{what}: invalid UTF-16 ({exc.reason})") from None
        if "\x00" in text:
            raise NdrError(f"{what}: NUL before the end of the string")
        return text


class NdrWriter:
    """Builds one stub; unique pointer ids are numbered as MIDL does."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._next_referent_id = FIRST_REFERENT_ID

    def getvalue(self) -> bytes:
        return bytes(self._buffer)

    def align(self, boundary: int) -> None:
        self._buffer += bytes(-len(self._buffer) % boundary)

    def _pack(self, layout: struct.Struct, value: int, what: str) -> None:
        try:
            packed = layout.pack(value)
        except struct.error as exc:
            raise NdrError(f"{what}: {value!r} does not fit: {exc}") from None
        self.align(layout.size)
        self._buffer += packed

    def u16(self, value: int, what: str = "uint16") -> None:
        self._pack(_U16, value, what)

    def u32(self, value: int, what: str = "uint32") -> None:
        self._pack(_U32, value, what)

    def i32(self, value: int, what: str = "int32") -> None:
        self._pack(_I32, value, what)

    def u64(self, value: int, what: str = "hyper") -> None:
        self._pack(_U64, value, what)

    def boolean32(self, value: bool, what: str = "BOOL") -> None:
        self.u32(1 if value else 0, what)

    def guid(self, value: uuid.UUID, what: str = "GUID") -> None:
        if not isinstance(value, uuid.UUID):
            raise NdrError(f"{what}: {value!r} is not a uuid.UUID")
        self.align(4)
        self._buffer += value.bytes_le

    def referent_id(self, present: bool) -> None:
        """Writes 0 for NULL, else a fresh non-zero id; the caller then writes the referent."""
        if present:
            self.u32(self._next_referent_id)
            self._next_referent_id += REFERENT_ID_STEP
        else:
            self.u32(0)

    def string(self, value: str, what: str = "string") -> None:
        if not isinstance(value, str):
            raise NdrError(f"{what}: {value!r} is not a str")
        if "\x00" in value:
            raise NdrError(f"{what}: a [string] cannot contain NUL")
        try:
            units = value.encode("utf-16-le") + _UTF16_NUL
        except UnicodeEncodeError as exc:
            raise NdrError(f"{what}: not representable in UTF-16 ({exc.reason})") from None
        count = len(units) // 2
        self.u32(count, f"{what} max_count")
        self.u32(0, f"{what} offset")
        self.u32(count, f"{what} actual_count")
        self._buffer += units
