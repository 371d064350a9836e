"""cluster.yaml is a valid Ray cluster-launcher config and matches the installed Ray."""

from __future__ import annotations

from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import validate_config

CONFIG = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_passes_rays_own_schema() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    validate_config(config)  # Ray's JSON schema: raises on unknown or missing fields


def test_cluster_image_matches_installed_ray_and_has_gpus() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    image = config["docker"]["image"]
    assert image.startswith(f"rayproject/ray:{ray.__version__}-py311") and image.endswith("-gpu"), image
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)
    setup = " ".join(config["setup_commands"])
    for package in ("tensorflow", "s3fs", "pyarrow", "skops"):
        assert package in setup


def test_the_schema_check_can_fail() -> None:
    import jsonschema
    import pytest

    config = yaml.safe_load(CONFIG.read_text())
    config["available_node_types"]["head"]["not_a_ray_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)
