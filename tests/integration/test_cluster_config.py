"""cluster.yaml: valid for the installed ray's cluster launcher, and fit for spade-batch.

Nothing here starts Ray or reaches AWS: the config is checked against the JSON
schema that ray ships and through ray's own config preparation, the steps that
`ray up` runs before it touches a cloud.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import tomllib
import yaml

# Private, but the very functions `ray up` runs on a config before it touches a cloud.
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"

Config = dict[str, Any]


@pytest.fixture(scope="module")
def schema() -> Config:
    """The cluster-config schema of the installed ray (what `ray up` validates against)."""
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


@pytest.fixture
def config() -> Config:
    """cluster.yaml as loaded by PyYAML; a fresh copy per test, free to mutate."""
    return yaml.safe_load(CLUSTER_YAML.read_text())


def gpu_worker_types(config: Config) -> dict[str, Config]:
    """Node types other than the head that offer at least one GPU."""
    return {
        name: node_type
        for name, node_type in config["available_node_types"].items()
        if name != config["head_node_type"] and node_type["resources"].get("GPU", 0) >= 1
    }


def check_head_node_type(config: Config) -> None:
    """The head node type exists and is a CPU node: it runs the driver, not shards."""
    head = config["available_node_types"].get(config.get("head_node_type"))
    assert head is not None, "head_node_type must name one of available_node_types"
    assert head["resources"].get("CPU", 0) >= 1, "the head must offer CPUs for the driver"
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"


def check_gpu_workers_autoscale(config: Config) -> None:
    """A GPU worker type can grow (max > min) and the global cap lets it."""
    gpu_types = gpu_worker_types(config)
    assert gpu_types, "no worker node type offers a GPU"
    for name, node_type in gpu_types.items():
        low, high = node_type.get("min_workers", 0), node_type["max_workers"]
        assert high > low, f"{name}: max_workers {high} must exceed min_workers {low}"
        assert config["max_workers"] >= high, f"global max_workers caps {name} below {high}"


def install_target(commands: list[str]) -> tuple[str, set[str], str]:
    """From setup commands: the `pip install -e` path, its extras, and the ray pin.

    Each command is split like a shell would; the pin is the version in
    ``ray[...]==X`` or ``ray==X``. Missing pieces come back as empty strings.
    """
    path, extras, ray_pin = "", set(), ""
    for command in commands:
        words = shlex.split(command)
        if words[:2] != ["pip", "install"]:
            continue
        for flag, word in zip(words, words[1:]):
            if flag == "-e":
                path, _, rest = word.partition("[")
                extras = {e.strip() for e in rest.rstrip("]").split(",") if e.strip()}
        for word in words:
            name, sep, version = word.partition("==")
            if sep and name.split("[")[0] == "ray":
                ray_pin = version
    return path, extras, ray_pin


def check_nodes_install_spade_batch(config: Config) -> None:
    """Head and GPU workers run `pip install -e` on the mounted repository copy,
    with extras that pyproject.toml defines, and the ray version installed here."""
    prepared = prepare_config(copy.deepcopy(config))
    mounted = [remote for remote, local in config.get("file_mounts", {}).items() if local == "."]
    assert mounted, "file_mounts must copy the repository ('.') to the nodes"
    extras_defined = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    node_commands = {"head": prepared["head_setup_commands"]}
    for name, node_type in gpu_worker_types(prepared).items():
        # A node type's own worker_setup_commands replace the global ones.
        node_commands[name] = node_type.get(
            "worker_setup_commands", prepared["worker_setup_commands"]
        )
    for node, commands in node_commands.items():
        path, extras, ray_pin = install_target(commands)
        assert path in mounted, f"{node}: no `pip install -e` of the mounted copy {mounted}"
        unknown = extras - extras_defined.keys()
        assert not unknown, f"{node}: extras {unknown} are not in pyproject.toml"
        assert ray_pin == ray.__version__, (
            f"{node}: ray pinned to {ray_pin!r} but {ray.__version__} is installed here"
        )


def test_cluster_yaml_matches_ray_schema(config: Config, schema: Config) -> None:
    jsonschema.validate(config, schema)


def test_cluster_yaml_passes_ray_up_validation(config: Config) -> None:
    # Defaults merged in, then ray's checks beyond the schema (head type
    # listed, sum of min_workers within max_workers, ...).
    validate_config(prepare_config(config))


def test_provider_is_aws_with_zones_in_region(config: Config) -> None:
    provider = config["provider"]
    assert provider["type"] == "aws"
    zones = provider["availability_zone"].split(",")
    assert all(zone.startswith(provider["region"]) for zone in zones), zones


def test_head_node_type_is_a_cpu_node(config: Config) -> None:
    check_head_node_type(config)


def test_gpu_workers_autoscale(config: Config) -> None:
    check_gpu_workers_autoscale(config)
    assert config["idle_timeout_minutes"] > 0


def test_nodes_install_spade_batch(config: Config) -> None:
    check_nodes_install_spade_batch(config)


def _set(path: tuple[str, ...], value: Any) -> Callable[[Config], None]:
    """A mutation that sets config[path...] = value (value None deletes the key)."""

    def mutate(config: Config) -> None:
        *parents, last = path
        node = config
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return mutate


# Where the broken copies below differ from cluster.yaml.
HEAD = ("available_node_types", "head_cpu")
WORKER = ("available_node_types", "worker_gpu")
SETUP = ("setup_commands",)
MOUNT = "/home/ubuntu/spade-batch"
RAY_PIN = f"ray[default]=={ray.__version__}"


@pytest.mark.parametrize(
    "mutate",
    [
        _set(("no_such_field",), 1),
        _set(("provider",), None),
        _set((*WORKER, "resources", "GPU"), -1),
        _set((*WORKER, "node_config"), None),
        _set((*WORKER, "min_wrokers"), 0),
    ],
    ids=["unknown-top-level-key", "no-provider", "negative-gpu", "no-node-config", "misspelt-key"],
)
def test_schema_rejects_broken_config(
    config: Config, schema: Config, mutate: Callable[[Config], None]
) -> None:
    jsonschema.validate(config, schema)  # the unbroken copy passes
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


INSTALLS = check_nodes_install_spade_batch
NO_INSTALL = "no `pip install -e`"


@pytest.mark.parametrize(
    ("check", "mutate", "reason"),
    [
        pytest.param(
            check_head_node_type, _set(("head_node_type",), "nope"), "must name", id="no-head-type"
        ),
        pytest.param(
            check_head_node_type, _set((*HEAD, "resources", "GPU"), 1), "CPU node", id="head-gpu"
        ),
        pytest.param(
            check_gpu_workers_autoscale, _set((*WORKER, "resources", "GPU"), None), "offers a GPU",
            id="no-gpu-worker",
        ),
        pytest.param(
            check_gpu_workers_autoscale, _set((*WORKER, "min_workers"), 8), "must exceed",
            id="fixed-size",
        ),
        pytest.param(
            check_gpu_workers_autoscale, _set(("max_workers",), 2), "caps", id="global-cap"
        ),
        pytest.param(
            INSTALLS, _set(SETUP, [f"pip install {RAY_PIN}"]), NO_INSTALL, id="no-install"
        ),
        pytest.param(
            INSTALLS, _set(("file_mounts",), {"/home/ubuntu/other": "."}), NO_INSTALL,
            id="install-not-mounted",
        ),
        pytest.param(
            INSTALLS, _set(SETUP, [f"pip install -e '{MOUNT}[gpu]' {RAY_PIN}"]), "not in pyproject",
            id="unknown-extra",
        ),
        pytest.param(
            INSTALLS, _set(SETUP, [f"pip install -e {MOUNT} ray==0.0.1"]), "ray pinned",
            id="ray-version",
        ),
        pytest.param(
            INSTALLS, _set((*WORKER, "worker_setup_commands"), ["true"]),
            f"worker_gpu: {NO_INSTALL}", id="worker-override-skips-install",
        ),
    ],
)
def test_product_checks_reject_broken_config(
    config: Config,
    check: Callable[[Config], None],
    mutate: Callable[[Config], None],
    reason: str,
) -> None:
    check(config)  # the unbroken copy passes
    mutate(config)
    with pytest.raises(AssertionError, match=re.escape(reason)):
        check(config)
