"""The model stage on a real local Ray (2 CPUs, no GPU): pooled workers and actors, resources, torch threads; and the
storage retry policy that the session's workers get from the environment."""

from __future__ import annotations

import dataclasses
import os
import sys
import uuid

import numpy as np
import pytest
import ray.cloudpickle
import ray.data
import torch

from spade_batch.config import Settings
from spade_batch.engine.runtime import SMALL_RUN_IMAGES, ModelStage
from spade_batch.formats import retry
from tests.integration.conftest import TEST_RETRY

pytestmark = pytest.mark.usefixtures("ray_local")

# The stages below are defined here, which Ray's workers cannot import: ship this module by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _Threads:
    """Reports the torch threads, process and instance that compute each batch; the same batches for each instance."""

    def __init__(self) -> None:
        self.instance = uuid.uuid4().int & 0xFFFFFFFF

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["id"])
        return {"threads": np.full(count, torch.get_num_threads()), "pid": np.full(count, os.getpid()),
                "instance": np.full(count, self.instance)}


def _run(stage: ModelStage) -> list[dict]:
    return (
        ray.data.from_items([{"id": i} for i in range(8)], override_num_blocks=4)
        .map_batches(**stage.map_arguments(_Threads, {}), batch_size=2, batch_format="numpy")
        .map_batches(lambda batch: batch, batch_size=2, batch_format="numpy", num_cpus=1)  # a CPU task alongside
        .take_all()
    )


def test_on_cpus_every_core_runs_a_single_threaded_pooled_worker_that_outlives_the_run_and_a_cpu_stays_schedulable() -> None:
    stage = ModelStage.on_cluster(Settings(device="cpu"))
    assert stage.pooled and stage.workers == 2 and stage.resources["num_cpus"] == 0.5  # 2 CPUs: 1 for the model, 1 for tasks
    first, second = _run(stage), _run(stage)
    assert len(first) == len(second) == 8 and {row["threads"] for row in first + second} == {1}
    # One stage per process and run: built on the run's first batch there, kept for its next ones, rebuilt by the next run.
    for rows in (first, second):
        assert len({row["instance"] for row in rows}) == len({row["pid"] for row in rows})
    assert not {row["instance"] for row in first} & {row["instance"] for row in second}
    assert {row["pid"] for row in second} & {row["pid"] for row in first}, "the second run started new processes"


def test_an_actor_pool_builds_one_stage_per_actor() -> None:
    """The GPU path (an actor pool), here on CPUs: what a pooled worker computes, an actor computes."""
    rows = _run(ModelStage(2, {"num_cpus": 0.5}))
    assert len(rows) == 8 and len({row["instance"] for row in rows}) == len({row["pid"] for row in rows}) <= 2


def test_explicit_workers_share_the_cores_and_gpu_requests_ask_for_gpus() -> None:
    actors = ModelStage.on_cluster(Settings(device="cpu", model_workers=1))
    assert (actors.resources, actors.threads) == ({"num_cpus": 1.0}, 2)
    assert {row["threads"] for row in _run(actors)} == {2}  # set in the worker, whatever its process was started with
    assert {row["threads"] for row in _run(dataclasses.replace(actors, pooled=False))} == {2}  # an actor's, from its runtime_env
    wide = ModelStage.on_cluster(Settings(device="cpu", model_workers=3))
    assert wide.workers == 3 and wide.resources["num_cpus"] == pytest.approx(1 / 3) and wide.threads == 1
    gpu = ModelStage.on_cluster(Settings(gpus_per_task=0.5, cpus_per_task=2.0))
    assert gpu.resources == {"num_cpus": 2.0, "num_gpus": 0.5} and gpu.workers == 1 and not gpu.pooled


def test_never_more_workers_than_batches_each_with_the_resources_of_the_full_pool_and_actors_for_long_runs() -> None:
    wide = ModelStage.on_cluster(Settings(device="cpu", model_workers=3))
    long = SMALL_RUN_IMAGES + 1
    assert [wide.for_run(batches, long).workers for batches in (0, 1, 2, 3, 7)] == [1, 1, 2, 3, 3]
    assert wide.for_run(1, long).resources == wide.resources and not wide.for_run(3, long).pooled
    small = wide.for_run(3, SMALL_RUN_IMAGES)  # one pooled worker with the three workers' CPUs and threads
    assert (small.pooled, small.workers, small.threads, small.resources["num_cpus"]) == (True, 1, 3, pytest.approx(1.0))
    gpu = ModelStage.on_cluster(Settings(gpus_per_task=0.5))
    assert not gpu.for_run(1, 1).pooled


def test_workers_retry_storage_calls_under_the_policy_the_environment_sets() -> None:
    """SPADE_BATCH_RETRY reaches Ray's workers (the session sets TEST_RETRY before ray.init): fault tests wait milliseconds."""

    @ray.remote
    def worker_policy() -> retry.RetryPolicy:
        return retry.RETRY

    assert ray.get(worker_policy.remote()) == retry.retry_policy_from(TEST_RETRY) != retry.RetryPolicy()
