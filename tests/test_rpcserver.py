"""The pipe adapter around the PDU layer (rpcserver.py): what it must not do to the event loop."""

from __future__ import annotations

import asyncio
import threading

from impacket import ntlm as impacket_ntlm
from impacket.dcerpc.v5 import rpcrt
from impacket.uuid import uuidtup_to_bin

from fsrvpd import dcerpc
from fsrvpd.constants import FSRVP_INTERFACE_UUID, FSRVP_INTERFACE_VERSION
from fsrvpd.ntlm import NtHashAccounts
from fsrvpd.rpcserver import receive, security_providers
from tests.support.inmemory import InMemoryPipe

USER, PASSWORD, DOMAIN = "backup", "secret", "WORKGROUP"
LOOP_WAIT_SECONDS = 10.0


class AccountsNeedingTheLoop(NtHashAccounts):
    """Accounts whose lookup finishes only once the event loop has run something else meanwhile:
    it never finishes if the lookup blocks the loop (as Samba's passdb lookup, pdbedit, would)."""

    def __init__(self) -> None:
        super().__init__({USER: impacket_ntlm.compute_nthash(PASSWORD).hex()})
        self.started, self.loop_ran = threading.Event(), threading.Event()
        self.waited: list[bool] = []

    def nt_hash(self, user):
        self.started.set()
        self.waited.append(self.loop_ran.wait(LOOP_WAIT_SECONDS))
        return super().nt_hash(user)


class LoopPipe(InMemoryPipe):
    """impacket's client, in a worker thread, whose PDUs reach the server through `receive` on the loop."""

    def __init__(self, server: dcerpc.ServerConnection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(server)
        self.loop = loop

    def send(self, data: bytes, forceWriteAndx: int = 0, forceRecv: int = 0) -> None:
        self.sent.append(data)
        self.events += asyncio.run_coroutine_threadsafe(receive(self.server, data), self.loop).result()
        self.delivered(self.server.data_to_send())


def test_an_account_lookup_during_a_bind_leaves_the_event_loop_free():
    accounts = AccountsNeedingTheLoop()
    server = dcerpc.ServerConnection({FSRVP_INTERFACE_UUID: FSRVP_INTERFACE_VERSION},
                                     security_providers=security_providers(accounts, DOMAIN, "FSRVPD"))

    def bind(pipe: LoopPipe) -> None:
        client = rpcrt.DCERPC_v5(pipe)
        client.set_credentials(USER, PASSWORD, DOMAIN)
        client.set_auth_type(rpcrt.RPC_C_AUTHN_WINNT)
        client.set_auth_level(rpcrt.RPC_C_AUTHN_LEVEL_PKT_PRIVACY)
        client.bind(uuidtup_to_bin((str(FSRVP_INTERFACE_UUID), "1.0")))

    async def main() -> LoopPipe:
        pipe = LoopPipe(server, asyncio.get_running_loop())
        binding = asyncio.create_task(asyncio.to_thread(bind, pipe))
        while not accounts.started.is_set() and not binding.done():
            await asyncio.sleep(0.01)
        accounts.loop_ran.set()  # the loop runs this (another pipe's work) while the lookup is under way
        await binding
        return pipe

    pipe = asyncio.run(main())
    assert accounts.waited == [True]
    results = [event for event in pipe.events if isinstance(event, dcerpc.AuthenticationResult)]
    assert [result.principal.user for result in results] == [USER]
