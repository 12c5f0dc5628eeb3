"""The model stage on a real local Ray (2 CPUs, no GPU): actors, resources, torch threads; and the storage
retry policy that the session's workers get from the environment."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import ray.cloudpickle
import ray.data
import torch

from spade_batch.config import Settings
from spade_batch.engine.runtime import ModelStage
from spade_batch.formats import retry
from tests.integration.conftest import TEST_RETRY

pytestmark = pytest.mark.usefixtures("ray_local")

# The actors run in their own runtime env, which cannot import this test module: ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _Threads:
    """Reports the torch threads of the actor process it runs in."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"threads": np.full(len(batch["id"]), torch.get_num_threads())}


def test_on_cpus_every_core_runs_a_single_threaded_model_actor_and_a_cpu_stays_schedulable() -> None:
    actors = ModelStage.on_cluster(Settings(device="cpu"))
    assert actors.workers == 2 and actors.resources["num_cpus"] == 0.5  # 2 CPUs: 1 reserved by the actors, 1 for tasks
    rows = (
        ray.data.from_items([{"id": i} for i in range(8)])
        .map_batches(_Threads, batch_size=2, batch_format="numpy", compute=actors.compute(), **actors.resources)
        .map_batches(lambda batch: batch, batch_size=2, batch_format="numpy", num_cpus=1)  # a CPU task alongside
        .take_all()
    )
    assert len(rows) == 8 and {row["threads"] for row in rows} == {1}


def test_explicit_workers_share_the_cores_and_gpu_requests_ask_for_gpus() -> None:
    actors = ModelStage.on_cluster(Settings(device="cpu", model_workers=1))
    assert actors.resources == {"num_cpus": 1.0, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2"}}}
    wide = ModelStage.on_cluster(Settings(device="cpu", model_workers=3))
    assert wide.workers == 3 and wide.resources["num_cpus"] == pytest.approx(1 / 3)
    assert wide.resources["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"
    gpu = ModelStage.on_cluster(Settings(gpus_per_task=0.5, cpus_per_task=2.0))
    assert gpu.resources == {"num_cpus": 2.0, "num_gpus": 0.5} and gpu.workers == 1


def test_never_more_actors_than_batches_each_with_the_resources_of_the_full_pool() -> None:
    wide = ModelStage.on_cluster(Settings(device="cpu", model_workers=3))
    assert [wide.for_batches(batches).workers for batches in (0, 1, 2, 3, 7)] == [1, 1, 2, 3, 3]
    assert wide.for_batches(1).resources == wide.resources


def test_workers_retry_storage_calls_under_the_policy_the_environment_sets() -> None:
    """SPADE_BATCH_RETRY reaches Ray's workers (the session sets TEST_RETRY before ray.init): fault tests wait milliseconds."""

    @ray.remote
    def worker_policy() -> retry.RetryPolicy:
        return retry.RETRY

    assert ray.get(worker_policy.remote()) == retry.retry_policy_from(TEST_RETRY) != retry.RetryPolicy()
