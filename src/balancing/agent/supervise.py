"""Keep the agent's long-running tasks alive: a task that fails is logged, counted and restarted.

A following task (the source, the periodic resync, the pod-cgroup scan) must never die silently: whatever it
raises, ``supervise`` logs it with the traceback, counts it (``balancing_task_restarts_total``), marks the
task down in ``HealthState`` (``/healthz`` answers 503 while any task is down) and runs it again after an
exponential backoff with jitter. The task itself says when it is healthy again (``HealthState.task_up``): the
source once its restarted stream delivered the whole state and it is programmed. A task that ran for a while
before failing starts again from the shortest delay. Cancellation (the agent stopping) passes through.
Neighbours: ``agent.lifecycle`` starts the tasks through this; ``agent.health`` serves their state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from balancing.agent.health import HealthState

__all__ = ["supervise"]

log = logging.getLogger(__name__)
_sleep = asyncio.sleep  # the restart delay (a seam for tests)
STEADY_AFTER = 60.0  # seconds of running after which a failure restarts with the shortest delay again


async def supervise(
    name: str,
    body: Callable[[], Awaitable[None]],
    *,
    health: HealthState,
    on_failure: Callable[[str], None],
    backoff: tuple[float, float] = (0.5, 30.0),
) -> None:
    """Run ``body()`` until cancelled, restarting it whenever it raises or returns."""
    first, cap = backoff
    delay = first
    while True:
        started = time.monotonic()
        try:
            await body()
            problem = "ended unexpectedly"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a following task must survive anything; the log has the traceback
            problem = type(exc).__name__  # /healthz may listen on every address: the details stay in the log
            log.error("task %s failed, restarting in %.1f s: %s: %s", name, delay, problem, exc, exc_info=exc)
        else:
            log.error("task %s %s, restarting in %.1f s", name, problem, delay)
        health.task_down(name, problem)
        on_failure(name)
        if time.monotonic() - started > STEADY_AFTER:
            delay = first
        await _sleep(delay * random.uniform(0.8, 1.2))
        delay = min(delay * 2, cap)
