"""Configuration: targets (typed, from YAML on a search path), device URLs, facts of this machine."""

from .device import Device, parse_device
from .host import physical_cores
from .targets import Target, get_target, list_targets

__all__ = ["Device", "Target", "get_target", "list_targets", "parse_device", "physical_cores"]
