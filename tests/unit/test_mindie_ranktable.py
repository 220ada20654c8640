"""The rank table a multi-node MindIE replica writes: MindIE's published shape, and clear refusals."""

import json

import pytest

from raystack.engines.mindie.ranktable import NodeDevices, RankTableError, device_ip, render_ranktable
from tests import FIXTURES
from tests.mindie_standin import install_hccn_tool




def test_the_table_matches_mindies_two_node_sample():
    sample = json.loads((FIXTURES / "mindie" / "ranktable.2node_8card.json").read_text())
    nodes = [NodeDevices(s["container_ip"], tuple((int(d["device_id"]), d["device_ip"]) for d in s["device"]))
             for s in sample["server_list"]]
    assert render_ranktable(nodes) == sample


def test_ranks_follow_node_order_then_device_order():
    table = render_ranktable([NodeDevices("10.0.0.2", ((5, "b"), (4, "a"))), NodeDevices("10.0.0.1", ((0, "c"), (1, "d")))])
    assert [(s["server_id"], [(d["device_id"], d["rank_id"]) for d in s["device"]]) for s in table["server_list"]] == [
        ("10.0.0.2", [("4", "0"), ("5", "1")]), ("10.0.0.1", [("0", "2"), ("1", "3")])]


@pytest.mark.parametrize("nodes, message", [
    ([NodeDevices("10.0.0.1", ((0, "a"),))], "2 nodes or more"),
    ([NodeDevices("10.0.0.1", ((0, "a"),)), NodeDevices("10.0.0.1", ((1, "b"),))], "same node IP"),
    ([NodeDevices("10.0.0.1", ((0, "a"),)), NodeDevices("10.0.0.2", ((0, "b"), (1, "c")))], "same number of NPUs"),
])
def test_a_placement_mindie_cannot_use_is_refused(nodes, message):
    with pytest.raises(RankTableError, match=message):
        render_ranktable(nodes)


def test_device_ips_come_from_hccn_tool(tmp_path):
    tool = str(install_hccn_tool(tmp_path))
    assert device_ip(0, tool) == "192.1.45.172" and device_ip(7, tool) != device_ip(0, tool)
    with pytest.raises(RankTableError, match=r"gave no ipaddr \(exit 255\): devid 12 is invalid"):
        device_ip(12, tool)
