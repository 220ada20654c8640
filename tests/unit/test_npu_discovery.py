"""NPU discovery, tested at its real boundary: a stand-in `npu-smi` executable that prints published npu-smi
output (tests/fixtures/npu-smi, see tests/fixtures/README.md) and a fake /dev directory. Nothing of raystack is mocked."""

import os
import re
import time
from pathlib import Path

import pytest

from raystack.cluster import npu, npu_smi
from raystack.cluster.npu_smi import NPUChip

from tests.npu_smi_standin import StandIn, fixture


@pytest.fixture
def stand_in(tmp_path):
    return lambda answers: StandIn(tmp_path / "bin", answers)


def make_dev(tmp_path: Path, count: int) -> str:
    """A /dev with davinci0..count-1 plus the driver's other nodes, which are not NPUs."""
    dev = tmp_path / "dev"
    dev.mkdir(exist_ok=True)
    for name in [f"davinci{i}" for i in range(count)] + ["davinci_manager", "devmm_svm", "hisi_hdc"]:
        (dev / name).touch()
    return str(dev)


def discover(smi: StandIn | str, dev: str, env: dict | None = None, **kwargs):
    lines: list[str] = []
    found = npu.discover(str(getattr(smi, "path", smi)), dev, env or {}, log=lines.append, **kwargs)
    return found, lines


# --- parsers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, npu_ids, chip_ids, healths, hbm",
    [
        ("info_910b3_8card.txt", list(range(8)), [0] * 8, ["OK"] * 8, [65536] * 8),
        (
            "info_310p3_duo_4card_critical.txt",
            [1, 1, 2, 2, 4, 4, 5, 5],
            [0, 1] * 4,
            ["OK"] * 4 + ["Critical"] + ["OK"] * 3,
            [47304, 46717, 47304, 46717, 44280, 43693, 44280, 43693],
        ),
        ("info_310p3_duo_container_nonseq_ids.txt", [0, 0, 96, 96, 32768, 32768, 32896, 32896], [0, 1] * 4,
         ["OK"] * 8, [44278, 43693] * 4),
        # HBM-Usage (32768), not Memory-Usage (the control CPU's 15137 MB DDR).
        ("info_910_8card_warning.docsample.txt", list(range(8)), [0] * 8,
         ["OK"] * 3 + ["Warning"] + ["OK"] * 3 + ["Warning"], [32768] * 8),
    ],
)
def test_parse_info_reads_every_chip_and_skips_the_process_table(name, npu_ids, chip_ids, healths, hbm):
    chips = npu_smi.parse_info(fixture(name))
    assert [c.npu_id for c in chips] == npu_ids
    assert [c.chip_id for c in chips] == chip_ids
    assert [c.health for c in chips] == healths
    assert [c.hbm_mb for c in chips] == hbm


def test_parse_info_takes_logic_ids_from_the_device_column_only():
    # 310P prints "Chip Device": Device is the logic id. 910B prints "Chip" alone: no logic id in the table.
    assert [c.logic_id for c in npu_smi.parse_info(fixture("info_310p3_duo_4card_critical.txt"))] == list(range(8))
    assert {c.logic_id for c in npu_smi.parse_info(fixture("info_910b3_8card.txt"))} == {None}


def test_parse_info_m_maps_chips_to_logic_ids_and_names():
    duo = npu_smi.parse_info_m(fixture("info_m_310p_duo.docsample.txt"))
    assert duo[(4, 0)] == (4, "Ascend xxx") and duo[(5, 1)] == (7, "Ascend xxx")
    assert duo[(4, 2)] == (None, "Mcu")
    assert len(duo) == 12


def test_parse_key_values_usages_board_memory():
    usages = npu_smi.parse_key_values(fixture("usages_910b3_i0.txt"))
    assert usages["HBM Capacity(MB)"] == "65536" and usages["NPU Utilization(%)"] == "0"
    assert npu_smi.parse_key_values(fixture("usages_910b1_i0.txt"))["HBM Capacity(MB)"] == "65536"
    board = npu_smi.parse_key_values(fixture("board_910b3_i0.txt"))
    assert board["PCI Device ID"] == "0xD802" and board["Model"] == "NA" and board["Chip Count"] == "1"
    assert npu_smi.parse_key_values(fixture("memory_910b_i1_c0.txt"))["HBM Capacity(MB)"] == "65536"


# --- TAB indentation: the mind-cluster FaultDiag captures keep npu-smi's leading TABs -------------------


def capture_sections(name: str) -> dict[str, str]:
    """The npu-smi outputs of a FaultDiag capture, keyed by the command after `npu-smi `."""
    sections: dict[str, str] = {}
    current: str | None = None
    for line in fixture(name).splitlines(keepends=True):
        m = re.match(r"/usr/local/bin/npu-smi (.*)$", line.rstrip("\n"))
        if m:
            current = m.group(1)
            sections[current] = ""
        elif re.match(r"(/|lspci |cat |pip )", line):
            current = None  # hccn_tool, lspci, version files: not npu-smi
        elif current is not None:
            sections[current] += line
    return sections


BEFORE = capture_sections("mindcluster_npu_info_before_910a.txt")
AFTER = capture_sections("mindcluster_npu_info_after_910a_alarm.txt")


def test_tab_indented_key_values_and_mapping():
    assert BEFORE["info -i 0 -t usages"].startswith("\tNPU ID")
    usages = npu_smi.parse_key_values(BEFORE["info -i 0 -t usages"])
    assert usages["HBM Capacity(MB)"] == "31129" and usages["DDR Capacity(MB)"] == "13553"
    assert npu_smi.parse_key_values(BEFORE["info -i 0 -c 0 -t board"])["Chip Name"] == "910A"
    assert npu_smi.parse_key_values(BEFORE["info -i 0 -c 0 -t health"])["Health Status"] == "OK"
    mapping = npu_smi.parse_info_m(BEFORE["info -m"])
    assert mapping == {(i, 0): (i, "Ascend 910A") for i in range(8)}


def test_tab_indented_health_alarm_with_multiline_error_information():
    health = npu_smi.parse_key_values(AFTER["info -i 0 -c 0 -t health"])
    assert health["Health Status"] == "Alarm"
    assert health["Error Code"] == "A4025021 8C03A000 8C084E00"
    assert health["Error Information"].splitlines()[-1].endswith("event state=Heartbeat Lost.")


@pytest.mark.parametrize("card0_health, healthy", [(BEFORE, 8), (AFTER, 7)], ids=["card0-ok", "card0-alarm"])
def test_empty_info_table_falls_back_to_info_m_and_per_chip_health(stand_in, tmp_path, card0_health, healthy):
    # The capture's `npu-smi info` printed nothing while `info -m` listed 8 chips. It has `-t health` and
    # `-t usages` for card 0 only; every other card replays card 0's answers from the "before" capture.
    answers = {"info": BEFORE["info"], "info -m": BEFORE["info -m"]}
    for i in range(8):
        health = card0_health if i == 0 else BEFORE
        answers[f"info -t health -i {i} -c 0"] = health["info -i 0 -c 0 -t health"]
        answers[f"info -t usages -i {i} -c 0"] = BEFORE["info -i 0 -t usages"]
    found, lines = discover(stand_in(answers), make_dev(tmp_path, 8))

    assert found.source == "npu-smi" and found.count == healthy
    assert found.chip_type == "Ascend910A"
    assert found.hbm_gib_per_npu == 30.4  # 31129 MB from `-t usages`
    assert any("info -m" in n for n in found.notes)
    if healthy == 7:
        assert [(c.npu_id, r) for c, r in found.excluded] == [(0, "health Alarm")]
        assert found.visible_devices() == "1,2,3,4,5,6,7"
        assert "NPU 0 chip 0 (logic id 0): excluded, health Alarm" in lines


# --- discover() against the published tables -----------------------------------------------------------


def test_910b3_node(stand_in, tmp_path):
    smi = stand_in({"info": fixture("info_910b3_8card.txt"), "info -m": fixture("info_m_910b_8card.docsample.txt")})
    found, lines = discover(smi, make_dev(tmp_path, 8))

    assert (found.source, found.count, found.excluded, found.notes) == ("npu-smi", 8, [], [])
    assert found.chip_type == "Ascend910B3"  # the table's "910B3", not -m's placeholder "Ascend xxx"
    assert found.hbm_gib_per_npu == 64.0
    assert found.visible_devices() == "0,1,2,3,4,5,6,7"
    assert all(c.hbm_mb == 65536 and c.health == "OK" for c in found.healthy)
    assert smi.calls() == ["info", "info -m"]  # the table had everything: no per-chip queries
    assert lines == []


def test_default_npu_smi_is_found_on_path(stand_in, tmp_path, monkeypatch):
    smi = stand_in({"info": fixture("info_910b3_8card.txt")})
    monkeypatch.setenv("PATH", f"{smi.path.parent}{os.pathsep}{os.environ['PATH']}")
    found = npu.discover(dev_dir=make_dev(tmp_path, 8), env={}, log=lambda _: None)
    assert (found.source, found.count, found.chip_type) == ("npu-smi", 8, "Ascend910B3")
    # Without `info -m`, logic ids are the chips' order; the note says so.
    assert found.visible_devices() == "0,1,2,3,4,5,6,7"
    assert any("logic ids taken from" in n for n in found.notes)


def hbm_hidden(table: str) -> str:
    """The 910B3 table with its HBM totals blanked to NA, so only `-t usages`/`-t memory` can tell."""
    return re.sub(r"\d+ / 65536", lambda m: "NA".ljust(len(m.group())), table)


@pytest.mark.parametrize("query", ["usages", "memory"])
def test_hbm_from_per_chip_queries_when_the_table_has_none(stand_in, tmp_path, query):
    answers = {"info": hbm_hidden(fixture("info_910b3_8card.txt"))}
    for i in range(8):  # the fixtures are card 0 (usages) and card 1 (memory) of 910B hosts; replayed per card
        if query == "usages":
            answers[f"info -t usages -i {i} -c 0"] = fixture("usages_910b3_i0.txt")
        else:
            answers[f"info -t memory -i {i} -c 0"] = fixture("memory_910b_i1_c0.txt")
    smi = stand_in(answers)
    found, _ = discover(smi, make_dev(tmp_path, 8))

    assert found.count == 8 and found.hbm_gib_per_npu == 64.0
    assert all(c.hbm_mb == 65536 for c in found.healthy)
    assert "info -t usages -i 7 -c 0" in smi.calls()
    assert ("info -t memory -i 7 -c 0" in smi.calls()) == (query == "memory")


def test_310p_duo_with_a_critical_chip(stand_in, tmp_path):
    smi = stand_in({"info": fixture("info_310p3_duo_4card_critical.txt"),
                    "info -m": fixture("info_m_310p_duo.docsample.txt")})
    found, lines = discover(smi, make_dev(tmp_path, 8))

    assert found.count == 7 and found.chip_type == "Ascend310P3"
    [(chip, reason)] = found.excluded
    assert (chip.npu_id, chip.chip_id, chip.logic_id, reason) == (4, 0, 4, "health Critical")
    assert "NPU 4 chip 0 (logic id 4): excluded, health Critical" in lines
    assert found.visible_devices() == "0,1,2,3,5,6,7"
    assert found.hbm_gib_per_npu == round(43693 / 1024, 2)  # the smallest healthy chip's memory
    assert found.notes == []


def test_container_with_non_sequential_npu_ids(stand_in, tmp_path):
    smi = stand_in({"info": fixture("info_310p3_duo_container_nonseq_ids.txt")})  # no `info -m` here
    found, _ = discover(smi, make_dev(tmp_path, 8))

    assert [(c.npu_id, c.chip_id, c.logic_id) for c in found.healthy] == [
        (0, 0, 0), (0, 1, 1), (96, 0, 2), (96, 1, 3), (32768, 0, 4), (32768, 1, 5), (32896, 0, 6), (32896, 1, 7)
    ]
    assert found.visible_devices() == "0,1,2,3,4,5,6,7"  # the Device column, not the card ids
    assert found.chip_type == "Ascend310P3"
    # The process table's rows with an empty process name are not chips.
    assert found.count == 8


def test_warning_cards_are_kept_by_default_and_logged(stand_in, tmp_path):
    # Doc sample: chip names are "xxx"; the chip-level board query names them (910A, from the 910A capture,
    # which matches the doc sample's "Ascend 910A" mapping per the fixtures README).
    answers = {"info": fixture("info_910_8card_warning.docsample.txt")}
    for i in range(8):
        answers[f"info -t board -i {i} -c 0"] = BEFORE["info -i 0 -c 0 -t board"]
    found, lines = discover(stand_in(answers), make_dev(tmp_path, 8))

    assert found.count == 8 and found.excluded == []
    assert found.chip_type == "Ascend910A"
    assert found.hbm_gib_per_npu == 32.0
    assert [ln for ln in lines if "Warning" in ln] == [
        "NPU 3 chip 0 (logic id 3): health Warning (a minor alarm), kept; allow_warning=False excludes it",
        "NPU 7 chip 0 (logic id 7): health Warning (a minor alarm), kept; allow_warning=False excludes it",
    ]
    assert any("health Warning and are kept" in n for n in found.notes)


def test_warning_cards_excluded_on_request_and_unknown_names_give_no_type(stand_in, tmp_path):
    smi = stand_in({"info": fixture("info_910_8card_warning.docsample.txt")})  # no board answers: names stay xxx
    found, lines = discover(smi, make_dev(tmp_path, 8), allow_warning=False)

    assert found.count == 6
    assert [(c.npu_id, r) for c, r in found.excluded] == [(3, "health Warning"), (7, "health Warning")]
    assert "NPU 7 chip 0 (logic id 7): excluded, health Warning" in lines
    assert found.visible_devices() == "0,1,2,4,5,6"
    assert found.chip_type is None
    assert any("chip type unknown" in n and "xxx" in n for n in found.notes)


def test_a3_phy_id_is_not_a_logic_id(stand_in, tmp_path):
    # Constructed after the A3 layout in vllm-ascend issues (e.g. #2534): two chips per card, "Chip Phy-ID",
    # name "Ascend910", Power "-" on the second chip. Values are ours. Phy-IDs 4..7 must not become logic ids.
    table = """\
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip  Phy-ID              | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 2     Ascend910           | OK            | 170.1       35                0    / 0             |
| 0     4                   | 0000:9D:00.0  | 0           0    / 0          3400 / 65536         |
+------------------------------------------------------------------------------------------------+
| 2     Ascend910           | OK            | -           35                0    / 0             |
| 1     5                   | 0000:9F:00.0  | 0           0    / 0          3100 / 65536         |
+===========================+===============+====================================================+
| 3     Ascend910           | OK            | 180.2       36                0    / 0             |
| 0     6                   | 0000:99:00.0  | 0           0    / 0          3400 / 65536         |
+------------------------------------------------------------------------------------------------+
| 3     Ascend910           | OK            | -           36                0    / 0             |
| 1     7                   | 0000:9B:00.0  | 0           0    / 0          3100 / 65536         |
+===========================+===============+====================================================+
"""
    found, _ = discover(stand_in({"info": table}), make_dev(tmp_path, 4))
    assert [(c.npu_id, c.chip_id, c.logic_id) for c in found.healthy] == [(2, 0, 0), (2, 1, 1), (3, 0, 2), (3, 1, 3)]
    # npu-smi names every A3 chip "Ascend910": the family is known, the model (Ascend910_93xx) is Ray's to say.
    assert (found.family, found.chip_type, found.hbm_gib_per_npu) == ("Ascend910_93", None, 64.0)
    assert any("Ray's own detection names the model" in n for n in found.notes)


def test_an_a3_board_query_completes_the_model_name(stand_in, tmp_path):
    # Our own variant: `-t board` on A3 says "Chip Name: Ascend910" and "NPU Name: 9392" (vllm-ascend's
    # setup.py joins them into the SoC name the same way).
    table = fixture("info_910b3_8card.txt").replace("910B3", "Ascend910".ljust(5))
    answers = {"info": table}
    for i in range(8):
        answers[f"info -t board -i {i} -c 0"] = "\tChip Name                      : Ascend910\n\tNPU Name                       : 9392\n"
    found, _ = discover(stand_in(answers), make_dev(tmp_path, 8))
    assert (found.family, found.chip_type) == ("Ascend910_93", "Ascend910_9392")


# --- disagreement and fallbacks ------------------------------------------------------------------------


def test_npu_smi_count_disagreeing_with_dev_is_noted_and_npu_smi_wins(stand_in, tmp_path):
    smi = stand_in({"info": fixture("info_910b3_8card.txt"), "info -m": fixture("info_m_910b_8card.docsample.txt")})
    found, lines = discover(smi, make_dev(tmp_path, 6))

    assert found.count == 8 and found.source == "npu-smi"
    [message] = found.notes
    assert "npu-smi lists 8 NPU chips" in message and "6 davinci devices" in message and "trusting npu-smi" in message
    assert message in lines


def test_missing_npu_smi_falls_back_to_dev(tmp_path):
    found, lines = discover(str(tmp_path / "no-such-npu-smi"), make_dev(tmp_path, 4))

    assert (found.source, found.count, found.chip_type, found.hbm_gib_per_npu) == ("/dev/davinci", 4, None, None)
    assert found.visible_devices() == "0,1,2,3"  # davinci_manager, devmm_svm, hisi_hdc are not NPUs
    assert "not found" in found.notes[0] and found.notes[0] in lines


def test_missing_npu_smi_on_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    found = npu.discover(dev_dir=make_dev(tmp_path, 2), env={}, log=lambda _: None)
    assert (found.source, found.count) == ("/dev/davinci", 2)


def test_dev_fallback_numbers_logic_ids_in_order(tmp_path):
    # A container given /dev/davinci3 and /dev/davinci5 sees them as logic ids 0 and 1.
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("davinci3", "davinci5", "davinci_manager"):
        (dev / name).touch()
    found, _ = discover(str(tmp_path / "no-such-npu-smi"), str(dev))
    assert [(c.npu_id, c.logic_id) for c in found.healthy] == [(3, 0), (5, 1)]


def test_failing_npu_smi_falls_back_to_dev(stand_in, tmp_path):
    smi = stand_in({"info": {"stdout": "DCMI module initialize failed. ret is -8005\n", "rc": 255}})
    found, _ = discover(smi, make_dev(tmp_path, 8))

    assert (found.source, found.count) == ("/dev/davinci", 8)
    assert "`npu-smi info` exited with 255: DCMI module initialize failed. ret is -8005" in found.notes[0]


def test_hanging_npu_smi_is_killed_after_the_timeout(stand_in, tmp_path):
    smi = stand_in({"info": {"stdout": fixture("info_910b3_8card.txt"), "sleep": 60}})
    start = time.monotonic()
    found, _ = discover(smi, make_dev(tmp_path, 2), timeout=1)

    assert time.monotonic() - start < 10
    assert (found.source, found.count) == ("/dev/davinci", 2)
    assert "timed out after 1 s" in found.notes[0]


def test_env_only_and_nothing_at_all(tmp_path):
    empty_dev = tmp_path / "empty-dev"
    empty_dev.mkdir()
    found, _ = discover(str(tmp_path / "no-such-npu-smi"), str(empty_dev), {"ASCEND_RT_VISIBLE_DEVICES": "0,1"})
    assert (found.source, found.visible_devices()) == ("ASCEND_RT_VISIBLE_DEVICES", "0,1")

    found, _ = discover(str(tmp_path / "no-such-npu-smi"), str(empty_dev))
    assert (found.source, found.count, found.chip_type) == ("none", 0, None)


# --- ASCEND_RT_VISIBLE_DEVICES restricts the result to its logic ids -----------------------------------


def test_visible_devices_restrict_npu_smi_chips(stand_in, tmp_path):
    smi = stand_in({"info": fixture("info_310p3_duo_4card_critical.txt"),
                    "info -m": fixture("info_m_310p_duo.docsample.txt")})
    found, lines = discover(smi, make_dev(tmp_path, 8), {"ASCEND_RT_VISIBLE_DEVICES": "3,4,5"})

    assert found.visible_devices() == "3,5"
    reasons = {c.logic_id: r for c, r in found.excluded}
    assert reasons[4] == "health Critical"  # health wins over the restriction as the reason
    assert reasons[0] == "not in ASCEND_RT_VISIBLE_DEVICES=3,4,5" and len(reasons) == 6
    assert len([ln for ln in lines if "excluded" in ln]) == 6


@pytest.mark.parametrize("value", ["", "NoDevFiles"])
def test_visible_devices_empty_means_none_as_in_ray(stand_in, tmp_path, value):
    smi = stand_in({"info": fixture("info_910b3_8card.txt")})
    found, _ = discover(smi, make_dev(tmp_path, 8), {"ASCEND_RT_VISIBLE_DEVICES": value})
    assert found.count == 0 and len(found.excluded) == 8


def test_visible_devices_restrict_the_dev_fallback_and_name_missing_ids(tmp_path):
    found, _ = discover(str(tmp_path / "no-such-npu-smi"), make_dev(tmp_path, 4),
                        {"ASCEND_RT_VISIBLE_DEVICES": "1, 3,9,x"})
    assert found.visible_devices() == "1,3"
    assert any("ignoring x" in n for n in found.notes)
    assert any("[9]" in n for n in found.notes)


def test_every_detected_chip_is_either_healthy_or_excluded(stand_in, tmp_path):
    smi = stand_in({"info": fixture("info_310p3_duo_4card_critical.txt")})
    found, _ = discover(smi, make_dev(tmp_path, 8), {"ASCEND_RT_VISIBLE_DEVICES": "0,4,7"})
    detected = {(c.npu_id, c.chip_id) for c in found.healthy} | {(c.npu_id, c.chip_id) for c, _ in found.excluded}
    assert len(detected) == len(found.healthy) + len(found.excluded) == 8
    assert isinstance(found.healthy[0], NPUChip)
