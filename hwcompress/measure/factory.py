"""The one place that decides where a target's latency comes from: this machine, a device behind an
RPC tracker, the target's cycle model, or nowhere (with the reason). A new backend is a module with a
``Measurer`` and one line here."""

from __future__ import annotations

from ..config.device import parse_device
from ..config.targets import Target
from .latency import Measurer, NotMeasurable


def measurer_for(target: Target, device: str | None = None, repeat: int = 30, min_repeat_ms: int = 100) -> Measurer:
    """How ``target`` is measured; ``device`` (rpc://HOST:PORT/KEY) overrides the target's own."""
    device = device or target.latency.device
    if device:
        from .rpc import RpcMeasurer

        return RpcMeasurer(parse_device(device), target.kind, repeat=repeat, min_repeat_ms=min_repeat_ms)
    if target.latency.method == "model":
        from .cycle_model import CycleModelMeasurer

        return CycleModelMeasurer(target)
    if target.latency.method == "local" and not target.is_cross:
        from .local import LocalMeasurer

        return LocalMeasurer(target.threads, repeat=repeat, min_repeat_ms=min_repeat_ms)
    if target.latency.method == "local" and target.kind == "cuda":  # the GPU of this machine
        from .local import LocalMeasurer

        return LocalMeasurer(target.threads, repeat=repeat, min_repeat_ms=min_repeat_ms, device_kind="cuda",
                             device_name=target.hardware_found or target.name)
    reason = (f"target {target.name} is measured on a device through an RPC tracker and no device "
              f"was given (--device rpc://HOST:PORT/KEY)")
    from ..backend.emulator import unavailable_reason

    why_not_emulated = unavailable_reason(target)
    if why_not_emulated is None:
        from .emulated import EmulatedMeasurer

        return EmulatedMeasurer(target, reason)
    return NotMeasurable(reason, f"the artifact for {target.name} cannot run on this machine ({why_not_emulated})")


def check_device(device: str | None) -> None:
    """Reach the tracker and find the device's key now, in seconds, before any tuning or building."""
    if device:
        from .rpc import free_servers

        free_servers(parse_device(device))
