"""What a CPU target's vector unit is (lanes per float32 vector, vector registers), read from the
ISA features LLVM reports for the target: the register blocking of the conv kernels and the
target's ``channel_multiple: auto`` both follow from it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VectorUnit:
    """What the register blocking needs to know about a CPU: lanes per vector, vector registers."""

    lanes: int
    registers: int

    @staticmethod
    def of(target) -> "VectorUnit":
        def has(feature: str) -> bool:
            return has_feature(feature, target)

        if has("avx512f"):
            return VectorUnit(16, 32)
        if has("avx2") or has("avx"):
            return VectorUnit(8, 16)
        if has("neon") or "aarch64" in str(target.attrs.get("mtriple", "")):
            return VectorUnit(4, 32)
        return VectorUnit(4, 16)


def has_feature(feature: str, target) -> bool:
    """Whether LLVM's ``target`` has an ISA feature (``avx512f``, ``avx512vnni``, ...)."""
    from tvm.target.codegen import target_has_features

    try:
        return bool(target_has_features(feature, target))
    except Exception:  # a feature name this LLVM does not know
        return False


def widest_lanes(count: int, lanes: int) -> int:
    """The widest vector, from ``lanes`` down by halves to 4, whose lanes divide ``count`` (output
    channels tiled by whole vectors); 0 where none does."""
    while lanes >= 4 and count % lanes:
        lanes //= 2
    return lanes if lanes >= 4 else 0
