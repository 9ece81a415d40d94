"""Targets and profiles: built-ins, user directories, schema errors."""

from __future__ import annotations

import textwrap

import pytest

from hwcompress.compress.profile import get_profile
from hwcompress.config import targets as config
from hwcompress.errors import HwcError


def test_builtin_targets_and_their_tvm_targets():
    targets = {t.name: t for t in config.list_targets()}
    assert set(targets) == {"host", "arm-a72", "nvidia-t4", "cuda", "npu16"}
    arm = targets["arm-a72"].tvm_target()
    assert arm.kind.name == "llvm" and str(arm.attrs["mtriple"]) == "aarch64-linux-gnu"
    assert not bool(arm.attrs["feature.has_dotprod"]), "cortex-a72 has no dot-product instructions"
    t4 = targets["nvidia-t4"].tvm_target()
    assert t4.kind.name == "cuda" and str(t4.attrs["arch"]) == "sm_75" and t4.host.kind.name == "llvm"
    host = targets["host"].tvm_target()
    assert str(host.attrs["mcpu"]) not in ("", "auto") and int(host.attrs["num-cores"]) >= 1
    assert targets["npu16"].channel_multiple == 16 and targets["npu16"].latency.method == "model"
    # host's channel multiple is "auto": the vector lanes of the CPU found (16 with AVX-512, 8 with AVX2).
    from hwcompress.config.vector_unit import VectorUnit

    assert targets["host"].channel_multiple == VectorUnit.of(host).lanes in (4, 8, 16)


def test_every_target_has_a_default_profile():
    for target in config.list_targets():
        profile = get_profile(target.name)
        assert profile.target == target.name and profile.recipes


def test_profiles_differ_where_the_hardware_does():
    npu = get_profile("npu16")
    assert "pow2" in npu.quantize.schemes
    assert "pow2" not in get_profile("host").quantize.schemes
    # arm-a72 has no dot-product: int8 is applied per layer, only where its latency table measures it faster.
    assert get_profile("arm-a72").quantize.per_layer is True
    # npu16 decides pow2 per layer (4-bit weights pay where weight traffic bounds a layer).
    assert npu.quantize.per_layer is True and config.get_target("npu16").latency.model.bits("pow2") == 4
    for name in ("host", "arm-a72", "nvidia-t4", "npu16"):
        assert get_profile(name).prune.per_layer is True
    # float16 is a candidate where tensor cores take it, never on a CPU target.
    assert "float16" in get_profile("nvidia-t4").quantize.usable_schemes(config.get_target("nvidia-t4"))
    assert "float16" not in get_profile("host").quantize.usable_schemes(config.get_target("host"))
    # ... and, with int8 there too, channels and ranks in the multiple int8 tensor cores take.
    t4 = get_profile("nvidia-t4")
    assert t4.prune.multiple_for(config.get_target("nvidia-t4")) == t4.lowrank.multiple_for(config.get_target("nvidia-t4")) == 16
    assert get_profile("npu16").prune.multiple_for(config.get_target("npu16")) == 16  # the target's own


def test_unknown_target_lists_known_ones():
    with pytest.raises(HwcError, match=r"unknown target 'riscv'; known targets: arm-a72, cuda, host, npu16, nvidia-t4"):
        config.get_target("riscv")


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_user_target_directory_adds_and_overrides(tmp_path, monkeypatch):
    _write(tmp_path / "rv.yaml", """
        name: riscv-c906
        description: RISC-V C906
        tvm: {target: {kind: llvm, mtriple: riscv64-linux-gnu}}
        channel_multiple: 8
        dtypes: [float32]
        latency: {method: rpc, device: "rpc://127.0.0.1:9190/c906"}
    """)
    target = config.get_target("riscv-c906", [tmp_path])
    assert target.rank_multiple == 8 and target.source == tmp_path / "rv.yaml"
    monkeypatch.setenv("HWC_TARGETS_PATH", str(tmp_path))
    assert config.get_target("riscv-c906").channel_multiple == 8
    _write(tmp_path / "host.yaml", """
        name: host
        description: my host override
        tvm: {target: {kind: llvm}}
        channel_multiple: 2
        dtypes: [float32]
        latency: {method: local}
    """)
    assert config.get_target("host").description == "my host override"


@pytest.mark.parametrize("body,fragment", [
    ("name: x\ndescription: d\ntvm: {target: {}}\nchannel_multiple: 4\ndtypes: [float32]\nlatency: {method: local}\n",
     "tvm.target: 'kind' is a required property"),
    ("name: x\ndescription: d\ntvm: {target: {kind: llvm}}\nchannel_multiple: 0\ndtypes: [float32]\nlatency: {method: local}\n",
     "channel_multiple: 0 is less than the minimum of 1"),
    ("name: x\ndescription: d\ntvm: {target: {kind: llvm}}\nchannel_multiple: 4\ndtypes: [float32]\nlatency: {method: guess}\n",
     "latency.method"),
    ("name: x\ndescription: [unclosed\n", "not valid YAML"),
    ("name: x\ndescription: d\ntvm: {target: {kind: cuda}}\nchannel_multiple: auto\ndtypes: [float32]\n"
     "latency: {method: local}\n", "channel_multiple: 'auto' (the vector lanes) is for CPU targets"),
])
def test_bad_target_file_is_one_clear_line(tmp_path, body, fragment):
    (tmp_path / "bad.yaml").write_text(body)
    with pytest.raises(HwcError) as info:
        config.list_targets([tmp_path])
    assert fragment in str(info.value) and "bad.yaml" in str(info.value) and "\n" not in str(info.value)


def test_user_profile_and_bad_profile(tmp_path):
    _write(tmp_path / "fast.yaml", """
        name: fast
        target: arm-a72
        passes: {prune: {enabled: true, ratios: [0.5]}}
    """)
    assert get_profile("arm-a72", "fast", [tmp_path]).prune.ratios == (0.5,)
    with pytest.raises(HwcError, match="no profile 'slow' for target 'arm-a72'; profiles for it: default, fast"):
        get_profile("arm-a72", "slow", [tmp_path])
    _write(tmp_path / "fast.yaml", """
        name: fast
        target: arm-a72
        passes: {prune: {enabled: true, ratios: [1.5]}}
    """)
    with pytest.raises(HwcError, match=r"passes.prune.ratios.0: 1.5 is greater than or equal to the maximum of 1"):
        get_profile("arm-a72", "fast", [tmp_path])


def test_missing_directory_is_refused(tmp_path):
    with pytest.raises(HwcError, match="does not exist"):
        config.list_targets([tmp_path / "nope"])
