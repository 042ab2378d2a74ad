"""The interface of a front door (embedded SMB server, Samba's smbd).

A front door accepts clients of the `\\PIPE\\FssagentRpc` named pipe and hands each opened pipe to
the daemon as an asyncio stream pair plus what it knows of the caller; it also publishes and
withdraws the snapshot shares `share@{GUID}` while clients stay connected.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
from typing import Awaitable, Callable

from ..ntlm import Accounts
from ..rpcauth import Principal


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who opened the pipe, as far as the front door authenticated them, and who the RPC layer
    authenticated on it (MS-RPCE 3.3.3.4.3: the identity a call is judged by)."""

    user: str
    domain: str
    address: str  # the client's IP address, for SetContext's same-client rule
    sids: frozenset[str] = frozenset()  # the session token's SIDs, where the front door knows them (Samba)
    rpc_principal: Principal | None = None


class FrontDoorError(Exception):
    """Publishing or withdrawing a share failed (e.g. a Samba tool failed); the message says why."""


PipeHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Caller], Awaitable[None]]


@dataclasses.dataclass(frozen=True)
class ShareSpec:
    """A share to publish: `path` is the directory tree served under `name`."""

    name: str
    path: str
    read_only: bool
    comment: str = ""
    base: str | None = None  # for a snapshot share: the share it is a copy of (Samba copies its settings)


class FrontDoor(abc.ABC):
    """Serves the FSRVP pipe and the shares; one instance per daemon."""

    # True: the daemon publishes the configured base shares here too.  False: another server (smbd)
    # serves them and this door only takes the snapshot shares.
    serves_base_shares = True

    @abc.abstractmethod
    async def start(self, handle_pipe: PipeHandler) -> None:
        """Start serving; every pipe open calls `handle_pipe` on the daemon's event loop."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop accepting clients and close open connections."""

    @abc.abstractmethod
    async def publish_share(self, share: ShareSpec) -> None:
        """Add (or replace) a share while the server runs."""

    @abc.abstractmethod
    async def unpublish_share(self, name: str) -> None:
        """Remove a share while the server runs (no error if it is not there)."""

    @abc.abstractmethod
    def accounts(self) -> Accounts:
        """The accounts that may authenticate RPC calls on the pipe (NTLM): this door's users."""

    @abc.abstractmethod
    def share_names(self) -> set[str]:
        """Names of the shares currently published (base and snapshot shares)."""
