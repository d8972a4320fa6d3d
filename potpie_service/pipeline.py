"""Runs a job's steps: claim the step, call Potpie, record the outcome, tell the room, schedule what follows.

One call of `Pipeline.run(job_id, seq)` runs steps back to back until the job must wait (a parse poll, a retry
backoff) or ends. Every step's outcome is committed before the next begins, so a crash resumes after the last
finished step. `seq` makes duplicate deliveries harmless: only the delivery for the job's current seq may run.
The step's lease is short and renewed while the step runs (leases.py), so a killed or frozen holder loses it
within one TTL.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


from . import analysis, green
from .analysis import Step
from .config import Settings
from .events import broadcast, ending, now_iso, status_update
from .jobs import JobStore
from .leases import LeaseKeeper, lease_ttl
from .model import MESSAGES, JobStatus, can_move
from .potpie import PermanentPotpieError, PotpieClient, TransientPotpieError

log = logging.getLogger(__name__)

Dispatch = Callable[[str, int, float], None]  # (job_id, seq, countdown seconds)


class Waits(Protocol):
    """Whether a run may wait for its job's next step itself instead of re-scheduling it (a green worker with
    slots to spare), and the wait, cut short when the worker stops."""

    def allowed(self) -> bool: ...

    def sleep(self, seconds: float) -> bool: ...  # True: waited it out; False: woken early (shutdown)

    def on_stop(self, callback: Callable[[], None]) -> None: ...  # when the worker gives up on running steps


class NoWaits:
    """Every wait is a re-scheduled task (prefork, threads): a waiting job holds no worker slot."""

    def allowed(self) -> bool:
        return False

    def sleep(self, seconds: float) -> bool:
        return False

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Prefork and threads stop running steps their own way (a cold shutdown cancels them)."""
Observe = Callable[[str, dict[str, str]], None]  # (what happened, job record after it): metrics, webhooks


def _ignore(_what: str, _job: dict[str, str]) -> None:
    """The default observer: nothing to do."""


@dataclass
class Advance:
    """The job goes on: new fields, and how long until its next step (0: at once)."""

    status: JobStatus
    fields: dict[str, Any] = field(default_factory=dict)
    wait: float = 0.0
    event_extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class End:
    """The job ends (finished or failed)."""

    status: JobStatus
    fields: dict[str, Any] = field(default_factory=dict)


def _is_news(job: dict[str, str], change: Advance) -> bool:
    """Whether the change alters the job (a state, a parse status, progress...) rather than repeat it."""
    return change.status.value != job.get("status") or any(job.get(name) != str(value)
                                                           for name, value in change.fields.items())


class JobFailed(Exception):
    """A step found that the job cannot succeed; the message is the failed_reason."""


class Pipeline:
    """Drives jobs through Potpie; shared by every task execution of a worker process."""

    def __init__(self, settings: Settings, store: JobStore, potpie: PotpieClient, dispatch: Dispatch,
                 reveal_token: Callable[[str], str | None], observe: Observe = _ignore,
                 waits: Waits | None = None) -> None:
        self.settings = settings
        self.waits = waits or NoWaits()
        self.observe = observe
        self.store = store
        self.potpie = potpie
        self.dispatch = dispatch
        self.reveal_token = reveal_token
        self.lease_s = lease_ttl(settings)
        self.leases = LeaseKeeper(store, self.lease_s)
        self.calls = green.Abortable()  # a cancelled job's Potpie call is aborted (cancels.py)
        self.waits.on_stop(lambda: self.calls.abort_all(green.Stopping))  # hand running steps back
    def run(self, job_id: str, seq: int) -> str:
        """Run the job's steps from `seq`; return what happened to this delivery (for logs and tests)."""
        token = uuid.uuid4().hex
        outcome, job = self.store.claim(job_id, seq, token, self.lease_s)
        if outcome != "ok":
            log.info("step skipped: %s", outcome, extra={"job_id": job_id, "seq": seq})
            return outcome
        self.leases.hold(job_id, token)
        try:
            return self._run_claimed(job, token, seq)
        except green.Aborted:  # the job was cancelled meanwhile: its end is written and announced already
            log.info("step stopped: the job was cancelled", extra={"job_id": job_id})
            return "cancelled"
        finally:
            self.leases.release(job_id)

    def _run_claimed(self, job: dict[str, str], token: str, seq: int) -> str:
        started = time.monotonic()
        while True:
            try:
                change = self._attempt(job)
            except green.Stopping:  # the worker stops: another one redoes this step from the start
                return self._hand_back(job, token, seq, 0.0)
            if isinstance(change, End):
                self._end(job, token, change)
                return "ended"
            # Go on in this run while it is within one step budget (the task's time limit allows two) and nothing
            # must wait, or a green worker may wait here (a poll interval, a retry backoff) rather than re-schedule.
            within = time.monotonic() - started + change.wait < self.settings.step_lease
            keep = within and (change.wait <= 0 or self.waits.allowed())
            due = time.time() + change.wait
            # A poll that found nothing new, while this run waits itself, has nothing to write or announce: the
            # job keeps its seq, and if this worker dies the lapsed lease lets the sweeper re-run that same step.
            if not (keep and change.wait > 0 and not _is_news(job, change)):
                seq += 1
                if not self._advance(job, token, seq, change, keep):
                    return "lease_lost"
                if not keep:
                    self.dispatch(job["id"], seq, change.wait)
                    return "scheduled"
            if change.wait > 0 and not self._wait(job["id"], change.wait):
                return self._hand_back(job, token, seq, max(0.0, due - time.time()))

    def _hand_back(self, job: dict[str, str], token: str, seq: int, countdown: float) -> str:
        """Give the job's step `seq` back to the queue (this worker stops): free the lease first, so the new
        delivery finds none."""
        self.store.release(job["id"], token)
        self.dispatch(job["id"], seq, countdown)
        log.info("step handed back: the worker is stopping", extra={"job_id": job["id"]})
        return "handed back"

    def _wait(self, job_id: str, seconds: float) -> bool:
        """Wait for the job's next step, holding its lease; False when the worker is stopping. A cancellation
        aborts the wait like a Potpie call."""
        try:
            with self.calls.watch(job_id):
                return self.waits.sleep(seconds)
        except green.Stopping:
            return False

    def _attempt(self, job: dict[str, str]) -> Advance | End:
        step = analysis.next_step(job)
        try:
            with self.calls.watch(job["id"]):
                return self._step(step, job)
        except JobFailed as exc:
            return End(JobStatus.FAILED, {"failed_reason": str(exc)})
        except PermanentPotpieError as exc:
            return End(JobStatus.FAILED, {"failed_reason": exc.reason})
        except TransientPotpieError as exc:
            return self._retry_or_fail(job, exc.reason, exc.retry_after)
        except Exception as exc:  # a bug must not wedge the job: count it as a failed attempt
            log.exception("step %s crashed", step.value, extra={"job_id": job["id"]})
            return self._retry_or_fail(job, f"internal error in {step.value}: {type(exc).__name__}", None)

    def _step(self, step: Step, job: dict[str, str]) -> Advance | End:
        working = {} if job.get("attempts", "0") != "0" else {"attempts": 1, "processed_at": now_iso()}
        if step is Step.SUBMIT_PARSE:
            return self._submit_parse(job, working)
        if step is Step.POLL_PARSE:
            return self._poll_parse(job, working)
        if step is Step.CREATE_CONVERSATION:
            conversation_id = self.potpie.create_conversation(job["potpie_project_id"])
            return Advance(JobStatus.PROCESSING_CONVERSATIONS,
                           {**working, "conversation_id": conversation_id,
                            "progress": analysis.PROGRESS["conversation"],
                            "message": "Asking Potpie's codebase agent the question..."})
        if step is Step.ASK_QUESTION:
            reply = self.potpie.send_message(job["conversation_id"], analysis.question_of(job))
            return Advance(JobStatus.PROCESSING_CONVERSATIONS,
                           {**working, "answer": reply.text, "citations": json.dumps(reply.citations),
                            "progress": analysis.PROGRESS["answered"],
                            "message": "Answer received; asking for the structured analysis..."})
        if step is Step.ASK_STRUCTURED:
            reply = self.potpie.send_message(job["conversation_id"], analysis.structured_prompt(job))
            return Advance(JobStatus.PROCESSING_CONVERSATIONS,
                           {**working, "analysis_text": reply.text, "progress": 95,
                            "message": "Structured analysis received; building the result..."})
        finished_at = now_iso()
        started = float(job.get("created_ts") or time.time())
        result = analysis.build_result(job, finished_at, int((time.time() - started) * 1000))
        return End(JobStatus.FINISHED, {"result": json.dumps(result), "progress": 100, "finished_at": finished_at,
                                        "message": MESSAGES[JobStatus.FINISHED]})

    def _submit_parse(self, job: dict[str, str], working: dict[str, Any]) -> Advance:
        found = None
        if job.get("parse_requested") == "1":  # an earlier try sent the request; did it reach Potpie?
            found = self.potpie.find_project(job["repo"], job["branch"])
        if found is None:
            self.store.mark(job["id"], parse_requested=1)
            job["parse_requested"] = "1"  # this run may go on to a retry of this step itself
            found = self.potpie.submit_parse(job["repo"], job["branch"], self._github_token(job))
        project_id, status = found
        started = {"potpie_project_id": project_id, "parse_started_at": job.get("parse_started_at") or time.time()}
        return self._parse_outcome(job, {**working, **started}, status, analysis.PROGRESS[JobStatus.PARSING])

    def _poll_parse(self, job: dict[str, str], working: dict[str, Any]) -> Advance:
        started = float(job.get("parse_started_at") or time.time())
        if time.time() - started > self.settings.parse_timeout:
            raise JobFailed(f"Potpie did not finish parsing within PARSE_TIMEOUT ({self.settings.parse_timeout:g} s); "
                            f"last status: {job.get('parse_status')}")
        status = self.potpie.parse_status(job["potpie_project_id"])
        return self._parse_outcome(job, working, status, int(job.get("progress") or 0))

    def _parse_outcome(self, job: dict[str, str], fields: dict[str, Any], status: str, progress: int) -> Advance:
        """What a Potpie parse status means for the job: failed, ready (also straight from a parse request, when
        Potpie already holds the repository), or still parsing, polled again after the interval."""
        state = analysis.parse_state(status)
        if state is JobStatus.FAILED:
            raise JobFailed("Potpie could not parse the repository (status: error). Check that the repository "
                            "and branch exist and that Potpie can access them.")
        if state is JobStatus.READY:
            return Advance(JobStatus.READY, {**fields, "parse_status": status, "parsed_at": now_iso(),
                                             "progress": analysis.PROGRESS[JobStatus.READY],
                                             "message": MESSAGES[JobStatus.READY]})
        return Advance(JobStatus.PARSING, {**fields, "parse_status": status,
                                           "progress": analysis.parse_progress(status, progress),
                                           "message": f"Potpie is parsing the repository (status: {status})"},
                       wait=self.settings.potpie_poll_interval)

    def _github_token(self, job: dict[str, str]) -> str | None:
        if job.get("has_github_token") != "1":
            return None
        token = self.reveal_token(job["id"])
        if token is None:
            raise JobFailed("the GitHub token could not be read: it expired, or TOKEN_ENCRYPTION_KEY differs "
                            "between the API and the worker")
        return token

    def _retry_or_fail(self, job: dict[str, str], reason: str, retry_after: float | None) -> Advance | End:
        attempts = max(1, int(job.get("attempts") or 1))
        if attempts > self.settings.max_retries:
            return End(JobStatus.FAILED, {"failed_reason": f"{reason} (gave up after {attempts} attempts)"})
        delay = self.settings.retry_base_delay * 2 ** (attempts - 1) * random.uniform(1.0, 1.2)
        delay = min(max(delay, retry_after or 0.0), self.settings.broker_visibility_timeout / 2)
        fields = {"attempts": attempts + 1, "last_error": reason, "progress": job.get("progress") or 0,
                  "message": f"Attempt {attempts} of {self.settings.max_retries + 1} failed: {reason}. "
                             f"Retrying in {delay:.1f} s."}
        if job.get("attempts", "0") == "0":
            fields["processed_at"] = now_iso()
        extra = {"attempt": attempts, "max_attempts": self.settings.max_retries + 1, "retry_in": round(delay, 3),
                 "error": reason}
        return Advance(JobStatus.RETRYING, fields, wait=delay, event_extra=extra)

    def _advance(self, job: dict[str, str], token: str, seq: int, change: Advance, keep: bool) -> bool:
        current = JobStatus(job.get("status", "queued"))
        if not can_move(current, change.status):
            log.error("refused transition %s -> %s", current.value, change.status.value, extra={"job_id": job["id"]})
            change = Advance(JobStatus.RETRYING, change.fields, wait=self.settings.retry_base_delay)
        # Only progress within one state may be throttled; every retry is news (attempt, delay, error).
        mode = "progress" if current is change.status and current is not JobStatus.RETRYING else "state"
        fields = {**change.fields, "status": change.status.value, "seq": seq,
                  "next_due": time.time() + change.wait}
        if current is not change.status:
            fields["status_since"] = time.time()  # when the job entered this state (metrics: time per state)
        after = {**job, **{k: str(v) for k, v in fields.items()}}
        news = broadcast(self.settings, job["id"], [("status_update", status_update(after, 0, **change.event_extra))])
        event_seq = self.store.commit(job["id"], token, fields, mode, keep_lease=keep, lease_s=self.lease_s,
                                      broadcast=news)  # published by the commit itself, unless throttled
        if event_seq < 0:
            log.warning("lost the step lease; another delivery owns the job", extra={"job_id": job["id"]})
            return False
        previous, since = job.get("status"), job.get("status_since", "")  # metrics: created_ts if none
        job.update(after)
        if previous != change.status.value:
            self.observe("transition", {**job, "previous_status": previous or "", "previous_since": since})
        if change.status is JobStatus.RETRYING:
            log.warning("attempt failed, retrying: %s", job.get("last_error"), extra={"job_id": job["id"]})
        return True

    def _end(self, job: dict[str, str], token: str, change: End) -> None:
        change.fields.setdefault("attempts", max(1, int(job.get("attempts") or 0)))
        if change.status is JobStatus.FAILED:
            change.fields.setdefault("finished_at", now_iso())
            change.fields.setdefault("message", change.fields["failed_reason"])
            log.error("job failed: %s", change.fields["failed_reason"], extra={"job_id": job["id"]})
        after, news = ending(self.settings, job, change.status, change.fields)
        seq, admitted = self.store.finish(job["id"], token, change.status, change.fields, broadcast=news)
        if seq < 0:
            log.warning("could not end the job (lease lost or already ended)", extra={"job_id": job["id"]})
            return
        previous, since = job.get("status", ""), job.get("status_since", "")  # metrics: created_ts if none
        job.update(after)
        self.observe("ended", {**job, "previous_status": previous, "previous_since": since})
        for admitted_id in admitted:
            self.dispatch(admitted_id, 0, 0)
