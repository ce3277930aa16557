"""The process environment Ray reads at import time, set before the gateway imports Ray (no Ray here)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import MutableMapping

#: Ray's switch for "this machine takes part in a multi-machine cluster"; off, a driver names its node by
#: the loopback address instead of the machine's outward one.
_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def prepare_ray_environment(address: str | None, environ: MutableMapping[str, str] | None = None) -> None:
    """Say what we want instead of inheriting Ray's defaults.

    - ``RAY_AUTH_MODE``: recent local clusters default to token auth; unless the operator set it (for a
      cluster that uses tokens), ours is ``disabled``.
    - A cluster on loopback (``--ray-address local``, or ``127.0.0.1:PORT`` from ``ray start
      --node-ip-address 127.0.0.1``): Ray would rewrite a loopback GCS address to the machine's outward
      address and fail to connect; its cluster switch off keeps the driver on loopback.
    """
    env = os.environ if environ is None else environ
    env.setdefault("RAY_AUTH_MODE", "disabled")
    host = (address or "").rpartition(":")[0]
    if address == "local" or (host and is_loopback(host)):
        env.setdefault(_CLUSTER_SWITCH, "0")
