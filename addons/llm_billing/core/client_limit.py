"""A rate per client address, for what costs the proxy work: looking up keys it does not
know (sans-I/O).

Each client network (an IPv4 address, an IPv6 /64: one host's usual allocation) has a
bucket of ``per_minute`` lookups, refilled continuously. The buckets are an LRU of
bounded size: a client evicted by a crowd of others starts again with a full bucket.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

from .plans import TokenBucket

MAX_CLIENTS = 100_000


def client_network(host: str) -> str:
    """The network a client address is limited as: itself, or its IPv6 /64."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # a dual-stack socket's IPv4 client
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class ClientRate:
    def __init__(self, per_minute: int, max_clients: int = MAX_CLIENTS) -> None:
        self.per_minute = per_minute  # 0: unlimited
        self._max_clients = max_clients
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, client: str, now: float) -> float:
        """Take one for ``client``: 0.0 when it may go on, else the seconds to wait."""
        if self.per_minute <= 0:
            return 0.0
        bucket = self._buckets.get(client)
        if bucket is None or bucket.capacity != self.per_minute:
            bucket = self._buckets[client] = TokenBucket(self.per_minute, now)
            while len(self._buckets) > self._max_clients:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(client)
        if (wait := bucket.wait_for(1, now)) > 0:
            return wait
        bucket.take(1, now)
        return 0.0

    def give_back(self, client: str, now: float) -> None:
        """Undo a ``take`` that turned out not to count (the key was valid)."""
        if (bucket := self._buckets.get(client)) is not None:
            bucket.adjust(-1, now)
