"""Ascend chip names as real nodes print them, parsed into family, model and HBM: the names come from
published npu-smi outputs (tests/fixtures/npu-smi), vllm-ascend, GPUStack and mind-cluster issues, and
torch_npu's SoC table (raystack/cluster/chips.py cites each)."""

import pytest

from raystack.cluster.chips import (A2, A3, A5, B310, GEN1, NOMINAL, P310, family_of, hbm_tier, nominal, parse_chip,
                                    tiers_at_least)


@pytest.mark.parametrize("name, family, model, hbm", [
    # npu-smi's table names (A2: vllm-ascend #6672, #975; 910B4: 1Panel #9472; 910B4-1: HAMi-WebUI #47;
    # 910B2C: gpustat #185)
    ("910B1", A2, "Ascend910B1", 64), ("910B2", A2, "Ascend910B2", 64), ("910B3", A2, "Ascend910B3", 64),
    ("910B4", A2, "Ascend910B4", 32), ("910B4-1", A2, "Ascend910B4-1", 64), ("910B2C", A2, "Ascend910B2C", 64),
    # the same as Ray registers them (acl.get_soc_name()) and as `npu-smi info -m` prints them
    ("Ascend910B4-1", A2, "Ascend910B4-1", 64), ("Ascend910B2C", A2, "Ascend910B2C", 64),
    ("Ascend 910B3", A2, "Ascend910B3", 64),
    # A3: the table says "Ascend910" for every chip (vllm-ascend #2534); the SoC name has the suffix
    ("Ascend910", A3, None, None), ("Ascend910_9392", A3, "Ascend910_9392", 64), ("Ascend910_9362", A3, "Ascend910_9362", 64),
    # 910 gen 1 (mind-cluster FaultDiag capture; vllm-ascend #3010 for the digitless 910B of 32 GB)
    ("Ascend 910A", GEN1, "Ascend910A", 32), ("910ProB", GEN1, "Ascend910ProB", 32), ("910B", GEN1, "Ascend910B", 32),
    # 310P (vllm-ascend #3316), its vNPU partitions, 310B, A5, and the CH HDK's A2 name
    ("310P3", P310, "Ascend310P3", None), ("Ascend310P3vir04", P310, "Ascend310P3vir04", None),
    ("Ascend310B4", B310, "Ascend310B4", None), ("Ascend950PR", A5, "Ascend950PR", None), ("A2G3", A2, None, None),
])
def test_real_chip_names_parse_into_family_model_and_hbm(name, family, model, hbm):
    chip = parse_chip(name)
    assert (chip.family, chip.model, chip.hbm_gib) == (family, model, hbm)


@pytest.mark.parametrize("name", ["xxx", "Ascend xxx", "Mcu", "NA", "-", "", "A100", "H800"])
def test_placeholders_and_other_chips_are_not_ascend_chips(name):
    assert parse_chip(name) is None


def test_deploy_configs_name_families_or_models():
    assert [family_of(t) for t in ("Ascend910B", "910B", "Ascend910_93", "310P", "Ascend910B3")] == [
        A2, A2, A3, P310, None]
    assert [family_of(t) for t in ("A2", "a3", "910C", "Ascend 910c")] == [A2, A3, A3, A3]  # vllm-ascend's names


def test_nominal_sizes_a_family_by_its_usual_server_and_a_model_by_its_own_size():
    assert nominal("910B") == NOMINAL[A2] and nominal("910C") == NOMINAL[A3] and nominal("310P") == NOMINAL[P310]
    b4 = nominal("Ascend910B4")
    assert (b4.chip, b4.hbm_gib, b4.npus_per_node) == ("Ascend910B4", 32, 8)
    die = nominal("Ascend910_9392")
    assert (die.chip, die.hbm_gib, die.npus_per_node, die.note) == ("Ascend910_9392", 64, 16, NOMINAL[A3].note)
    assert nominal("310P3") == NOMINAL[P310]  # the Duo's chip: the one 310P model with a size
    assert [nominal(n) for n in ("310P1", "Ascend950", "Ascend310B4", "xxx", "H800")] == [None] * 5


def test_hbm_labels_are_tiers_so_selectors_can_ask_for_at_least():
    assert [hbm_tier(g) for g in (65536 / 1024, 32768 / 1024, 31129 / 1024, 47304 / 1024, 43693 / 1024, 21525 / 1024)] == [
        64, 32, 32, 48, 48, 24]
    assert tiers_at_least(44.5) == (48, 64, 96, 128, 144, 192, 256)
