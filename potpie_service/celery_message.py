"""The first step of a job as Celery would put it on the broker, forged once per process and filled in per job:
Celery's protocol-2 task message inside kombu's Redis envelope, and its task-sent event. The submit script pushes
them with the job itself (one Redis round trip instead of a script, an LPUSH and a PUBLISH through a kombu producer,
about half of a submit's CPU). The one place this service writes bytes Celery and kombu read:
tests/test_queue.py compares the result with what `send_task` writes, field by field, at the pinned versions.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.events.event import Event
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from celery.utils.time import utcoffset
from kombu.utils.uuid import uuid

from .logs import mask

RUN_STEP = "potpie.run_step"


@dataclass(frozen=True)
class StepMessage:
    """A job's first step as the broker would hold it, for the submit script to push with the job itself (one
    round trip): the Celery message in kombu's Redis envelope, and its task-sent event for Flower."""

    body: str           # pushed onto the Celery queue's list
    event_channel: str  # where kombu publishes a task-sent event
    event: str


class FirstSteps:
    """`run_step(job_id, 0)` as `send_task` would put it on the broker (kombu's Redis envelope around Celery's
    protocol-2 message) and its task-sent event, for the submit script to push with the job: the API's submit is
    one Redis round trip instead of a script, an LPUSH and a PUBLISH through a kombu producer (about half of its
    CPU). Both are built once per process by Celery's own `as_task_v2` and event constructor, with placeholders
    where a message differs from the next (job and task ids, delivery tag, clock, time); a call fills them in.
    tests/test_queue.py holds the result to what `send_task` writes."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app, self.queue = app, queue
        db = str(app.connection_for_write().virtual_host or "0").strip("/") or "0"  # kombu's fanout prefix
        self.event_channel = f"/{db}.{app.conf.event_exchange}/task.sent"
        self._built: tuple[int, str, str, str, str, str] | None = None  # for this pid (the name carries it)

    def __call__(self, job_id: str) -> StepMessage:
        pid, body_head, body_tail, message, event_body, event = self._templates()
        task_id = uuid()
        body = base64.b64encode(f"{body_head}{job_id}{body_tail}".encode()).decode()
        sent = (event_body.replace(_TASK, task_id).replace(_JOB, job_id)
                .replace(f'"{_CLOCK}"', str(self.app.clock.forward())).replace(f'"{_TIME}"', repr(time.time())))
        return StepMessage(
            message.replace(_TASK, task_id).replace(_JOB, job_id).replace(_BODY, body).replace(_TAG, uuid()),
            self.event_channel,
            event.replace(_BODY, base64.b64encode(sent.encode()).decode()).replace(_TAG, uuid()))

    def _templates(self) -> tuple[int, str, str, str, str, str]:
        if self._built is None or self._built[0] != os.getpid():
            args, origin = [_JOB, 0], anon_nodename()
            argsrepr = mask(saferepr(args))
            headers, properties, body, sent = self.app.amqp.as_task_v2(
                _TASK, RUN_STEP, args, argsrepr=argsrepr, kwargsrepr="{}", origin=origin, ignore_result=None,
                create_sent_event=True)
            head, _, tail = json.dumps(body).partition(_JOB)
            message = _envelope(headers, {**properties, "argsrepr": argsrepr, "kwargsrepr": "{}", "delivery_mode": 2,
                                          "delivery_info": {"exchange": "", "routing_key": self.queue}})
            event = Event("task-sent", hostname=origin, utcoffset=utcoffset(), pid=os.getpid(), clock=_CLOCK, **sent,
                          queue=self.queue, exchange="", routing_key=self.queue, timestamp=_TIME)
            exchange = self.app.conf.event_exchange
            self._built = (os.getpid(), head, tail, message, json.dumps(event), _envelope({"hostname": origin}, {
                "delivery_mode": 1, "delivery_info": {"exchange": exchange, "routing_key": "task.sent"}}))
        return self._built


# FirstSteps' placeholders: none can occur in a job id (hex), a task id (uuid) or anything else the message holds
_JOB, _TASK, _BODY, _TAG, _CLOCK, _TIME = "@job@", "@task@", "@body@", "@tag@", "@clock@", "@time@"


def _envelope(headers: dict[str, Any], properties: dict[str, Any]) -> str:
    """kombu's Redis message around a base64-encoded JSON body (`_BODY`, filled in later)."""
    return json.dumps({
        "body": _BODY, "content-encoding": "utf-8", "content-type": "application/json", "headers": headers,
        "properties": {**properties, "priority": 0, "body_encoding": "base64", "delivery_tag": _TAG},
    })
