"""The decision of :func:`shared.reach.require_reachable` (the marker check itself runs on three real
nodes in tests/multinode)."""

import pytest

from shared import reach
from shared.errors import ClusterUnreachable, ConfigError

TWO = [{"NodeID": "a" * 56}, {"NodeID": "b" * 56}]


def test_remote_uris_and_one_node_need_no_marker(monkeypatch):
    monkeypatch.setattr(reach, "working_nodes", lambda: pytest.fail("remote URIs are shared by construction"))
    reach.require_reachable("s3://bucket/out", "out")
    reach.require_reachable("gs://bucket/out", "out")
    monkeypatch.setattr(reach, "working_nodes", lambda: TWO[:1])
    monkeypatch.setattr(reach, "blind_nodes", lambda *a: pytest.fail("one node sees what the driver sees"))
    reach.require_reachable("file:///tmp/out", "out")


def test_a_blind_node_is_a_config_error_and_silence_is_a_cluster_error(monkeypatch, tmp_path):
    monkeypatch.setattr(reach, "working_nodes", lambda: TWO)
    monkeypatch.setattr(reach, "blind_nodes", lambda path, nodes, t: (["10.0.0.2 (bbbbbbbb)"], []))
    with pytest.raises(ConfigError, match=r"1 of the cluster's 2 nodes cannot see it \(10.0.0.2 .*Use an s3:// URI"):
        reach.require_reachable(str(tmp_path), "out")
    monkeypatch.setattr(reach, "blind_nodes", lambda path, nodes, t: ([], ["10.0.0.2 (bbbbbbbb)"]))
    with pytest.raises(ClusterUnreachable, match="no answer from 10.0.0.2"):
        reach.require_reachable(str(tmp_path), "train.storage_path")
    monkeypatch.setattr(reach, "blind_nodes", lambda path, nodes, t: ([], []))
    reach.require_reachable(str(tmp_path), "out")
