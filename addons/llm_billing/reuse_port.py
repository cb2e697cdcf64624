"""ReusePort addon: several proxy processes on one host listen on one port (``SO_REUSEPORT``).

With ``--set reuse_port=true`` every TCP listener mitmproxy opens sets ``SO_REUSEPORT``, so
N proxy processes (``scripts/serve.py --workers N``) bind the same address and the Linux
kernel spreads new connections across them (a hash of each connection's addresses and
ports: evenly over many connections; a keep-alive connection stays with its process).
No balancer process sits in the path; README "Several workers" has the measurement
against HAProxy.

mitmproxy 12 opens its TCP listeners in ``AsyncioServerInstance.listen`` with
``asyncio.start_server(self.handle_stream, host, port)`` and has no option for the socket,
and a mode's server class cannot be replaced (``ServerInstance.__init_subclass__``
registers one class per mode). So this wraps that one method, as ``finish_upstream``
patches ``Http1Server``: with the option on, a TCP-only listener is opened with the same
call plus ``reuse_port=True``; with it off (the default), or for UDP modes and port 0,
mitmproxy's own method runs unchanged.

mitmdump starts its first listener in a task that runs before ``-s`` scripts are loaded
(they load in a task of their own), so that listener would bind without the option and
a second worker's would fail. Hence ``reuse_port=true`` goes with ``server=false`` on the
command line (scripts/serve.py passes both; the option alone is refused at start): no
listener opens until ``running``, where — after ``ProxyDefaults`` switched to reverse
mode — this addon turns ``server`` on, and the reverse listener opens through the
wrapped method.

Off by default: with it on, a second proxy started by mistake on a busy port would share
its traffic instead of failing. Linux lets only processes of the same user share a port.
"""

from __future__ import annotations

import asyncio

from mitmproxy import ctx, exceptions
from mitmproxy.proxy.mode_servers import AsyncioServerInstance

OPTION = "reuse_port"

_original_listen = AsyncioServerInstance.listen


class ReusePort:
    def __init__(self) -> None:
        self.is_running = False

    def load(self, loader) -> None:
        loader.add_option(
            OPTION, bool, False,
            "Listen with SO_REUSEPORT, so several proxy processes share the port and the "
            "kernel spreads connections across them; needs server=false too, this addon "
            "starts the listener (scripts/serve.py sets both).",
        )
        install()

    def configure(self, updated: set[str]) -> None:
        if OPTION in updated and ctx.options.reuse_port and ctx.options.server \
                and not self.is_running:
            raise exceptions.OptionsError(
                "reuse_port=true needs server=false as well: mitmproxy opens its first "
                "listener before scripts load, without SO_REUSEPORT")

    def running(self) -> None:
        self.is_running = True
        if ctx.options.reuse_port and not ctx.options.server:
            ctx.options.update(server=True)  # after ProxyDefaults: listens in reverse mode


def install() -> None:
    AsyncioServerInstance.listen = _listen  # type: ignore[method-assign]


async def _listen(self: AsyncioServerInstance, host: str, port: int) -> list:
    """``AsyncioServerInstance.listen``, with ``SO_REUSEPORT`` when the option is on."""
    if not getattr(ctx.options, OPTION, False) or self.mode.transport_protocol != "tcp" \
            or port == 0:
        return await _original_listen(self, host, port)
    return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]
