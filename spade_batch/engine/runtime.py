"""Ray runtime: joining a cluster, the model stage's resources, streaming a dataset with progress."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.data
from tqdm import tqdm

from spade_batch.config import Settings
from spade_batch.engine.errors import user_error

log = logging.getLogger(__name__)


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray sized to this machine."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False, log_to_driver=True)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # our own progress counts images, on a terminal and in logs
    context.print_on_execution_start = False
    # A stage's own exception reaches the driver as the cause of Ray's RayTaskError (a PermissionError
    # naming the path), not as "UDF failed to process a data block" with the cause left as text.
    context.raise_original_map_exception = True
    ray_data_errors = logging.getLogger("ray.data.exceptions")
    if not any(isinstance(f, _OwnErrorsFilter) for f in ray_data_errors.filters):
        ray_data_errors.addFilter(_OwnErrorsFilter())


class _OwnErrorsFilter(logging.Filter):
    """Drops Ray Data's report of an exception one of our stages raised: passed on as itself (init_ray), it
    looks to Ray Data like a bug in Ray ("please open an issue", a full traceback). The CLI prints it in
    one line, and the traceback at --log-level DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        handled = sys.exc_info()[1]  # Ray Data logs from inside its `except` block
        return handled is None or type(user_error(handled)).__module__.split(".")[0] == "ray"


def _keep_path(error: BaseException) -> None:
    """Record an OSError's path where it survives the trip to the driver: Ray Data appends its retry
    note to the exception's args, which turns into the filename when Ray rebuilds it there."""
    if isinstance(error, OSError) and error.filename is not None and not hasattr(error, "spade_path"):
        error.spade_path = str(error.filename)  # type: ignore[attr-defined]


def task_stage(function: Callable[..., Any]) -> Callable[..., Any]:
    """A CPU stage function (cpu_stages.py) as a Ray Data task runs it: its errors reach the driver whole."""

    @functools.wraps(function)
    def run(batch: Any, **kwargs: Any) -> Any:
        try:
            return function(batch, **kwargs)
        except OSError as error:
            _keep_path(error)
            raise

    return run


def actor_stage(stage: type) -> type:
    """The model stage class `stage` as Ray Data's actors run it: its errors reach the driver whole.

    An exception in an actor's __init__ kills the actor: Ray keeps only its text (an ActorDiedError
    with colour codes, after retrying the actor) and the driver cannot tell a damaged model from a
    crash. Here it is raised by the actor's first batch instead, so it reaches the driver as itself
    (init_ray), and the CLI names it (exit_codes.explain).
    """

    class Stage(stage):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._init_error: Exception | None = None
            try:
                super().__init__(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - raised again, as itself, by the first batch
                self._init_error = error

        def __call__(self, batch: Any) -> Any:
            try:
                if self._init_error is not None:
                    raise self._init_error
                return super().__call__(batch)
            except OSError as error:
                _keep_path(error)
                raise

    Stage.__name__ = Stage.__qualname__ = stage.__name__  # Ray Data names its operator after the class
    return Stage


CPU_TASK: dict[str, Any] = {"num_cpus": 1}
"""map_batches' named resource parameters of a CPU task (decoding before the model stage; feature parts, or masks
and scores parts, after it). The model stage always asks for something else (GPUs, or a fraction of a CPU), so Ray
Data never fuses decoding into it, which would serialise decoding with the model again."""

_built: tuple[str, Any] | None = None
"""The model stage this pooled worker process built for the run it serves last: (run key, stage)."""


def pooled_stage(batch: Any, *, stage: type, run: str, threads: int, arguments: dict[str, Any]) -> Any:
    """The model stage as a Ray task in one of the job's pooled worker processes (CPU clusters).

    The process builds stage(**arguments) on the run's first batch it gets and keeps it for the run's next ones, so the
    backbone and gallery load once per process and run; another run's first batch replaces it. Unlike an actor's, the
    process outlives the run, with Python, Ray and torch imported: a run after the first starts no process (about 5 s
    per model worker on a CPU). An error building the stage is raised by the batch, as itself.
    """
    global _built
    import torch

    torch.set_num_threads(threads)  # the process is shared with decode and output tasks, and started without a runtime_env
    if _built is None or _built[0] != run:
        _built = None  # the previous run's model goes before this one's loads
        _built = (run, stage(**arguments))
    return _built[1](batch)


SMALL_RUN_IMAGES = 64
"""On CPUs, a run of at most this many images uses one pooled worker with all the model workers' threads, a larger one
an actor pool. The pooled worker spares a small run the actors' start (about 5 s per actor: 8 tiny images 0.28-0.39 s
against 6.5-9.0 s; 60 images of resnet18 at 224 px 0.81x the time of two actors). Several pooled workers are not
used: Ray Data runs them as tasks within its per-operator CPU budget, and they ran one at a time (60 images at 224 px:
1.42x the actors' time; 1,600 images at 128 px: 1.7x)."""


@dataclass(frozen=True)
class ModelStage:
    """Where the model stage runs: `workers` at a time, each with these Ray resources.

    With GPUs, and for long runs on CPUs (for_run): an actor pool, one actor per GPU (or per gpus_per_task). For
    small runs on CPU-only clusters: Ray tasks in the job's pooled worker processes (pooled_stage), one worker with
    all the threads (for_run). On CPUs each worker runs `threads` torch threads (actors get
    them as OMP_NUM_THREADS from a runtime_env; pooled workers set them, so that they share the job's default worker
    pool and its processes stay warm): every core computes the model, and together they reserve all but one CPU, so
    the light decode and output tasks always find a slot and run in the gaps.
    """

    workers: int
    resources: dict[str, Any] = field(default_factory=dict)
    """map_batches' named remote parameters of each worker (num_cpus, num_gpus, runtime_env, resources)."""
    pooled: bool = False
    """Tasks in pooled worker processes (CPU clusters) rather than an actor pool (GPUs)."""
    threads: int = 1
    """torch threads of each worker on CPUs."""

    @classmethod
    def on_cluster(cls, settings: Settings) -> ModelStage:
        cluster = ray.cluster_resources()
        gpus = settings.gpus_per_task
        if gpus is None:
            gpus = 1.0 if cluster.get("GPU", 0) > 0 and settings.device != "cpu" else 0.0
        if gpus > 0:
            auto = max(1, math.floor(cluster.get("GPU", 0) / gpus))
            return cls(settings.model_workers or auto, {"num_cpus": settings.cpus_per_task, "num_gpus": gpus})
        cpus = cluster.get("CPU", 1)
        workers = settings.model_workers or max(1, math.floor(cpus / settings.cpus_per_task))
        # Many few-threaded workers beat one many-threaded one: a thread that loses its core to a
        # decode task or to Ray itself stalls only its own worker, not its siblings at every barrier
        # (2 cores: scoring 10% faster with 2 x 1 thread than with 1 x 2 threads).
        threads = max(1, math.floor(cpus / workers))
        reserved = min(settings.cpus_per_task, max(0.0, (cpus - 1) / workers))
        return cls(workers, {"num_cpus": reserved}, pooled=True, threads=threads)

    @property
    def gpus(self) -> float:
        """GPUs each worker holds (0 on CPU)."""
        return float(self.resources.get("num_gpus", 0))

    def for_run(self, batches: int, images: int) -> ModelStage:
        """These workers for a run of `images` in `batches`: on CPUs, a run of at most SMALL_RUN_IMAGES gets one pooled
        worker with all their CPUs and threads, a longer one an actor pool; and never more workers than batches (each
        loads the backbone and, scoring, the gallery before its first batch, so one beyond the batches is a start that
        computes nothing: a re-run left with a few images, a small night)."""
        if self.pooled and images <= SMALL_RUN_IMAGES:
            cpus = {"num_cpus": self.resources["num_cpus"] * self.workers}
            return dataclasses.replace(self, workers=1, threads=self.threads * self.workers, resources={**self.resources, **cpus})
        return dataclasses.replace(self, workers=max(1, min(self.workers, batches)), pooled=False)

    def map_arguments(self, stage: type, arguments: dict[str, Any]) -> dict[str, Any]:
        """map_batches' arguments that run the model stage class `stage`, built as stage(**arguments), on these workers."""
        if self.pooled:
            return {"fn": task_stage(pooled_stage), "compute": ray.data.TaskPoolStrategy(size=self.workers), **self.resources,
                    "fn_kwargs": {"stage": stage, "run": uuid.uuid4().hex, "threads": self.threads, "arguments": arguments}}
        threads = {"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(self.threads)}}} if not self.gpus else {}
        return {"fn": actor_stage(stage), "fn_constructor_kwargs": arguments,
                "compute": ray.data.ActorPoolStrategy(size=self.workers), **threads, **self.resources}


class Progress:
    """Images done: a tqdm bar on a terminal, a log line at most every log_every_s otherwise."""

    def __init__(self, description: str, images: int, log_every_s: float = 30.0):
        self.description, self.images, self.done = description, images, 0
        self.started = self.logged = time.monotonic()
        self.log_every_s = log_every_s
        self.bar = tqdm(total=images, desc=description, unit="img") if sys.stderr.isatty() else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def advance(self, images: int) -> None:
        self.done += images
        if self.bar is not None:
            self.bar.update(images)
        elif time.monotonic() - self.logged >= self.log_every_s or self.done == self.images:
            self.logged = time.monotonic()
            rate = self.done / max(self.logged - self.started, 1e-9)
            log.info("%s: %d/%d images, %.2f images/s", self.description, self.done, self.images, rate)

    @property
    def images_per_second(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)


def stream(dataset: ray.data.Dataset, progress: Progress) -> Iterator[dict[str, np.ndarray]]:
    """The dataset's (small) result batches as they complete, counted into progress."""
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        progress.advance(len(batch["id"]))
        yield batch
