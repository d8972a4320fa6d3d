"""What the worker reads and does through Celery's worker internals, in one place: the requests running in this
process (`celery.worker.state.active_requests`, each with its `id`, `time_start` and `acknowledge()`), the running
task's own request (`celery.current_task.request`), and the consumer's `cancel_task_queue`. Celery documents none
of them as public API: tests/test_celery_seams.py fails, naming what changed, when an upgrade moves one.
"""

from __future__ import annotations

from typing import Any

from celery.worker import state as worker_state


def running_requests() -> tuple[Any, ...]:
    """The task requests this worker process is running (a snapshot: the set changes under us)."""
    return tuple(worker_state.active_requests)


def running_count() -> int:
    """How many task requests this worker process is running."""
    return len(worker_state.active_requests)


def acknowledge_current() -> None:
    """Ack the running task's message now (once), instead of when the task returns (acks_late)."""
    from celery import current_task

    context = current_task.request if current_task else None
    if context is None or getattr(context, "psvc_acked", False):
        return
    context.psvc_acked = True
    for request in running_requests():
        if request.id == context.id:
            request.acknowledge()
            return


def stop_consuming(consumer: Any, queue: str) -> None:
    """Stop taking messages from `queue` at once (the consumer's own loop notices a shutdown only later)."""
    consumer.cancel_task_queue(queue)
