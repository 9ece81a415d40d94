"""Device URLs: ``rpc://TRACKER_HOST:PORT/KEY`` names the boards registered under KEY at a TVM RPC tracker."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import HwcError

_URL = re.compile(r"^rpc://(?P<host>[^/:]+):(?P<port>\d+)/(?P<key>[^/]+)$")


@dataclass(frozen=True)
class Device:
    host: str
    port: int
    key: str

    @property
    def url(self) -> str:
        return f"rpc://{self.host}:{self.port}/{self.key}"


def parse_device(url: str) -> Device:
    match = _URL.match(url or "")
    if not match:
        raise HwcError(f"device {url!r}: expected rpc://TRACKER_HOST:PORT/KEY, e.g. rpc://127.0.0.1:9190/rasp4")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise HwcError(f"device {url!r}: port {match['port']} is not in 1..65535")
    return Device(match["host"], port, match["key"])
