"""The project's fixes to how TVM lowers math on CPUs, installed once per process (by every build
and by MetaSchedule's builder, so that tuning candidates are built as the final model is)."""

from __future__ import annotations


def install_lowering_rules() -> None:
    """The project's fixes to how TVM lowers math on CPUs (process-wide, idempotent)."""
    from .fast_erf import install as install_erf
    from .fast_exp import install as install_exp

    allow_vectorized_rounding()
    install_exp()
    install_erf()


def allow_vectorized_rounding() -> None:
    """Let TVM vectorize ``nearbyint`` (round half to even, what every quantize does). TVM 0.27
    does not mark it vectorizable, so its loop vectorizer turned each quantize epilogue into 16
    scalar roundings per vector (LLVM sometimes re-vectorized them, sometimes not: MobileNetV2's
    first depthwise conv ran 2x slower); LLVM has the vector instruction (``vrndscaleps``)."""
    import tvm

    op = tvm.ir.Op.get("tirx.nearbyint")
    if not op.get_attr("TVectorizable"):
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)
