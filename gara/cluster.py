"""The Ray cluster a command runs on: the configured one, or a local one of our own.

One rule for every command that uses Ray (``gara train``, and ``gara corrupt`` /
``gara evaluate`` with ``--ray-workers``): the address in ``train.ray_address``, else Ray's own
``RAY_ADDRESS`` (the local stack's env.sh, KubeRay pods, the retrain flow's ``ray_address``),
else a cluster started for this command on 127.0.0.1 and shut down after it. A command never
shuts down a cluster it joined.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gara.config import TrainConfig


def cluster_address(configured: str | None) -> str | None:
    """The cluster to join: ``configured`` (train.ray_address), else RAY_ADDRESS, else None (our own)."""
    return configured or os.environ.get("RAY_ADDRESS") or None


def connect(address: str | None, num_cpus: int, object_store_mb: int) -> bool:
    """Initialise Ray unless it already is; True when this call started it (then shut it down)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind to 127.0.0.1
    import ray

    if ray.is_initialized():
        return False
    address = cluster_address(address)
    if address:  # an existing cluster: joining one takes no resource arguments
        ray.init(address=address)
    else:
        # "local": a cluster of our own. Without it Ray joins any Ray it finds running on this
        # machine (another user's `ray start`, a concurrent test worker's cluster) and refuses
        # our resource arguments, or we shut down a cluster that is not ours.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            object_store_memory=object_store_mb * 1024 * 1024,
            _node_ip_address="127.0.0.1",
        )
    return True


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int, object_store_mb: int) -> Iterator[None]:
    """Ray for the block (see :func:`connect`); shut down after it only if the block started it."""
    started = connect(address, num_cpus, object_store_mb)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


@dataclass(frozen=True)
class RayWorkers:
    """Run a command's work on ``count`` Ray workers (0: in this process) of the cluster at
    ``address`` (the rule above); a local cluster we start gets ``object_store_mb``."""

    count: int
    address: str | None
    object_store_mb: int

    @classmethod
    def configured(cls, count: int, train: TrainConfig) -> RayWorkers:
        """``count`` workers on the cluster the params name (train.ray_address, train.object_store_mb)."""
        return cls(count, train.ray_address, train.object_store_mb)

    def session(self):
        return ray_session(self.address, max(1, self.count), self.object_store_mb)


# An actor that dies mid-item (a killed process, a lost node) is restarted and the item retried
# this many times; an exception the item itself raises is never retried (it would raise again).
ACTOR_RETRIES = 3


def map_on_actors(
    actor_class: type,
    init_args: tuple[Any, ...],
    count: int,
    method: str,
    items: Sequence[Any],
    on_result: Callable[[Any], None] | None = None,
    num_gpus: float = 0,
) -> list[Any]:
    """``actor.<method>(item)`` for every item on ``count`` actors of ``actor_class`` (each built
    once, from ``init_args``), results in the order of ``items``. Call inside a Ray session.

    Each item's result is taken once: an actor killed mid-item is restarted (its ``__init__``
    runs again) and the item retried, and a result only counts when its call returns. An error
    raised by an item comes out here as itself (the CLI's one-line message), not as Ray's wrapper.
    """
    import ray
    from ray.util import ActorPool

    remote = ray.remote(num_cpus=1, num_gpus=num_gpus, max_restarts=ACTOR_RETRIES,
                        max_task_retries=ACTOR_RETRIES)(actor_class)
    actors = [remote.remote(*init_args) for _ in range(max(1, min(count, len(items))))]
    results: list[Any] = []
    try:
        for result in ActorPool(actors).map(lambda actor, item: getattr(actor, method).remote(item), items):
            results.append(result)
            if on_result is not None:
                on_result(result)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from exc
        raise
    finally:
        for actor in actors:
            ray.kill(actor)
    return results
