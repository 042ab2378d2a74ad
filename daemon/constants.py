"""Protocol constants of MS-FSRVP, named as in the specification (section 2.2)."""

import enum
import uuid

FSRVP_INTERFACE_UUID = uuid.UUID("a8e0653c-2744-4389-a61d-7373df8b2292")
FSRVP_INTERFACE_VERSION = (1, 0)
PIPE_NAME = "FssagentRpc"

FSRVP_MIN_VERSION = 1
FSRVP_MAX_VERSION = 1


class HResult(enum.IntEnum):
    """Return values of the FSRVP operations (MS-FSRVP 2.2.4)."""

    S_OK = 0x00000000
    E_ACCESSDENIED = 0x80070005
    E_INVALIDARG = 0x80070057
    E_OUTOFMEMORY = 0x8007000E
    E_UNEXPECTED = 0x8000FFFF
    FSRVP_E_BAD_STATE = 0x80042301
    FSRVP_E_SHADOW_COPY_SET_IN_PROGRESS = 0x80042316
    FSRVP_E_NOT_SUPPORTED = 0x8004230C
    FSRVP_E_WAIT_TIMEOUT = 0x00000102
    FSRVP_E_WAIT_FAILED = 0xFFFFFFFF
    FSRVP_E_OBJECT_ALREADY_EXISTS = 0x8004230D
    FSRVP_E_OBJECT_NOT_FOUND = 0x80042308
    FSRVP_E_UNSUPPORTED_CONTEXT = 0x8004231B
    FSRVP_E_SHADOWCOPYSET_ID_MISMATCH = 0x80042501
    FSSAGENT_E_TIMEOUT = 0x80042500


def hresult_name(value: int) -> str:
    """The name MS-FSRVP gives a result, or its hex value (fault statuses, unknown codes)."""
    try:
        return HResult(value).name
    except ValueError:
        return f"{value:#010x}"


class Context(enum.IntEnum):
    """Shadow copy contexts of SetContext (MS-FSRVP 2.2.2.2), without attribute bits."""

    BACKUP = 0x00000000
    FILE_SHARE_BACKUP = 0x00000010
    NAS_ROLLBACK = 0x00000019
    APP_ROLLBACK = 0x00000009


ATTR_PERSISTENT = 0x00000001  # in NAS_ROLLBACK and APP_ROLLBACK: kept until deleted, never auto-released
ATTR_NO_AUTO_RECOVERY = 0x00000002
ATTR_AUTO_RECOVERY = 0x00400000
CONTEXT_ATTRIBUTES = ATTR_NO_AUTO_RECOVERY | ATTR_AUTO_RECOVERY


class Opnum(enum.IntEnum):
    """Operation numbers of the FileServerVssAgent interface (MS-FSRVP 3.1.4)."""

    GetSupportedVersion = 0
    SetContext = 1
    StartShadowCopySet = 2
    AddToShadowCopySet = 3
    CommitShadowCopySet = 4
    ExposeShadowCopySet = 5
    RecoveryCompleteShadowCopySet = 6
    AbortShadowCopySet = 7
    IsPathSupported = 8
    IsPathShadowCopied = 9
    GetShareMapping = 10
    DeleteShareMapping = 11
    PrepareShadowCopySet = 12
