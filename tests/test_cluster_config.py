"""cluster.yaml is a valid Ray cluster-launcher config and matches the installed Ray."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import ray
import yaml
from ray.autoscaler._private.util import validate_config

CONFIG = Path(__file__).resolve().parents[1] / "cluster.yaml"
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirement_name(req: str) -> str:
    match = re.match(r"[A-Za-z0-9_.-]+", req)
    assert match, req
    return match.group(0).lower()


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


def test_setup_installs_pyprojects_dependencies_with_gpu_tensorflow_and_the_pinned_ray() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    setup = [a for cmd in config["setup_commands"] for a in shlex.split(cmd) if not a.startswith("-")]
    assert setup[:2] == ["pip", "install"], setup
    installed = {_requirement_name(r): r for r in setup[2:]}
    assert set(installed) == {_requirement_name(r) for r in deps}  # nothing missing, nothing extra
    assert installed["tensorflow"].startswith("tensorflow[and-cuda]")
    (ray_req,) = [r for r in deps if _requirement_name(r) == "ray"]
    assert installed["ray"] == ray_req == f"ray[data,default]=={ray.__version__}"
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_autoscaling_keeps_a_gpu_node_up_and_the_head_decodes_only() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # a CPU head
    gpu_types = [t for t in types.values() if t["node_config"]["InstanceType"].startswith(("g", "p"))]
    # min_workers >= 1: --gpus-per-worker is refused by a cluster with no GPU node up
    assert gpu_types and all(1 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"] for t in gpu_types)
