from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_rays_own_schema() -> None:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs no trial
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert any(
        t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        for t in workers
    )
    assert any("pip install" in c and "raysoup" in c for c in config["setup_commands"])


def test_schema_validation_can_fail() -> None:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["available_node_types"]["head"]["node_cfg"] = {}
    with pytest.raises(jsonschema.ValidationError, match="node_cfg"):
        validate_config(prepare_config(config))
