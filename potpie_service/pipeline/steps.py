"""Runs a job's steps: claim the step, call Potpie, record the outcome, tell the room, schedule what follows.

One call of `Pipeline.run(job_id, seq)` runs steps back to back until the job must wait (a parse poll, a retry
backoff) or ends. Every step's outcome is committed before the next begins, so a crash resumes after the last
finished step. `seq` makes duplicate deliveries harmless: only the delivery for the job's current seq may run.
The step's lease is short and renewed while the step runs (store/leases.py), so a killed or frozen holder loses
it within one TTL.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from typing import Callable, Protocol


from .. import green
from ..config import Settings
from ..core import analysis
from ..core.analysis import Step
from ..core.events import STATUS_UPDATE, final_events, now_iso, retry_details, status_update
from ..core.job import Change, Job, JobUpdate
from ..core.model import MESSAGES, JobStatus, Stage, can_move
from ..github import GitHubClient
from ..potpie.client import PermanentPotpieError, PotpieClient, TransientPotpieError, Trace
from ..store.jobs import JobStore
from ..store.leases import LeaseKeeper, lease_ttl
from .agents import AgentRuns
from .outcomes import Advance, End, JobFailed
from .parsing import Parsing
from ..store import StoreUnavailable

log = logging.getLogger(__name__)

Dispatch = Callable[[str, int, float], None]  # (job_id, seq, countdown seconds)
Observe = Callable[[Change], None]  # what a job just went through: metrics, webhooks


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


def _ignore(_change: Change) -> None:
    """The default observer: nothing to do."""


def _is_news(job: Job, change: Advance) -> bool:
    """Whether the change alters the job (a state, a parse status, progress...) rather than repeat it. The count
    of Potpie calls is bookkeeping, not news: a poll that changed nothing else writes nothing, and the count rides
    along with the job's next commit."""
    return change.status is not job.status or any(
        getattr(job, name) != value for name, value in change.update.items() if name != "potpie_calls")


class Pipeline:
    """Drives jobs through Potpie; shared by every task execution of a worker process."""

    def __init__(self, settings: Settings, store: JobStore, potpie: PotpieClient, dispatch: Dispatch,
                 reveal_token: Callable[[str], str | None], observe: Observe = _ignore,
                 waits: Waits | None = None, github: GitHubClient | None = None) -> None:
        self.settings = settings
        self.waits = waits or NoWaits()
        self.observe = observe
        self.store = store
        self.potpie = potpie
        self.dispatch = dispatch
        self.parsing = Parsing(settings, store, potpie, github or GitHubClient(settings.github_api_url), reveal_token)
        self.agents = AgentRuns(store, potpie)
        self.agent_problem: str | None = None  # set when Potpie does not list POTPIE_AGENT_ID (checked at start-up)
        self.lease_s = lease_ttl(settings)
        self.leases = LeaseKeeper(store, self.lease_s)
        self.calls = green.Abortable()  # a cancelled job's Potpie call is aborted (cancels.py)
        self.waits.on_stop(self._stop_running)

    def _stop_running(self) -> None:
        """The worker gives up on running steps: each run hands its step back (green.Stopping)."""
        self.calls.abort_all(green.Stopping)

    def run(self, job_id: str, seq: int) -> str:
        """Run the job's steps from `seq`; return what happened to this delivery (for logs and tests)."""
        token = uuid.uuid4().hex
        outcome, job = self.store.claim(job_id, seq, token, self.lease_s)
        if job is None:
            log.info("step skipped: %s", outcome, extra={"job_id": job_id, "seq": seq})
            return outcome
        self.leases.hold(job_id, token)
        try:
            return self._run_claimed(job, token, seq)
        except green.Aborted:  # the job was cancelled meanwhile: its end is written and announced already
            log.info("step stopped: the job was cancelled", extra={"job_id": job_id})
            return "cancelled"
        except StoreUnavailable as exc:  # Redis away, failing over, or short of REDIS_MIN_REPLICAS_ACK replicas
            log.warning("step put off, the sweeper runs it again once its lease lapses: %s", exc,
                        extra={"job_id": job_id, "seq": seq})
            return "redis_unavailable"
        finally:
            self.leases.release(job_id)

    def _run_claimed(self, job: Job, token: str, seq: int) -> str:
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
            if keep and change.wait > 0 and not _is_news(job, change):
                job.potpie_calls = change.update.get("potpie_calls", job.potpie_calls)
            else:
                seq += 1
                if not self._advance(job, token, seq, change, keep):
                    return "lease_lost"
                if not keep:
                    self.dispatch(job.id, seq, change.wait)
                    return "scheduled"
            if change.wait > 0 and not self._wait(job.id, change.wait):
                return self._hand_back(job, token, seq, max(0.0, due - time.time()))

    def _hand_back(self, job: Job, token: str, seq: int, countdown: float) -> str:
        """Give the job's step `seq` back to the queue (this worker stops): free the lease first, so the new
        delivery finds none."""
        self.store.release(job.id, token)
        self.dispatch(job.id, seq, countdown)
        log.info("step handed back: the worker is stopping", extra={"job_id": job.id})
        return "handed back"

    def _wait(self, job_id: str, seconds: float) -> bool:
        """Wait for the job's next step, holding its lease; False when the worker is stopping. A cancellation
        aborts the wait like a Potpie call."""
        try:
            with self.calls.watch(job_id):
                return self.waits.sleep(seconds)
        except green.Stopping:
            return False

    def _attempt(self, job: Job) -> Advance | End:
        step = analysis.next_step(job)
        trace = Trace(job.id, step.value, max(1, job.attempts))  # names every Potpie request; counts them
        outcome: Advance | End
        try:
            with self.calls.watch(job.id):
                outcome = self._step(step, job, trace)
        except JobFailed as exc:
            outcome = End(JobStatus.FAILED, {"failed_reason": str(exc)})
        except PermanentPotpieError as exc:
            outcome = End(JobStatus.FAILED, {"failed_reason": exc.reason})
        except TransientPotpieError as exc:
            outcome = self._retry_or_fail(job, exc.reason, exc.retry_after)
        except StoreUnavailable:  # not an attempt: nothing may have reached Potpie (run() puts the step off)
            raise
        except Exception as exc:  # a bug must not wedge the job: count it as a failed attempt
            log.exception("step %s crashed", step.value, extra={"job_id": job.id})
            outcome = self._retry_or_fail(job, f"internal error in {step.value}: {type(exc).__name__}", None)
        if trace.calls:
            outcome.update["potpie_calls"] = trace.added_to(job.potpie_calls)
        return outcome

    def _step(self, step: Step, job: Job, trace: Trace) -> Advance | End:
        working: JobUpdate = {} if job.attempts else {"attempts": 1, "processed_at": now_iso()}
        if step is Step.SUBMIT_PARSE:
            return self.parsing.submit(job, working, trace)
        if step is Step.POLL_PARSE:
            return self.parsing.poll(job, working, trace)
        if step is Step.CREATE_CONVERSATION:
            if self.agent_problem:
                raise JobFailed(self.agent_problem)
            conversation_id = self.potpie.create_conversation(job.potpie_project_id, self.settings.potpie_agent_id,
                                                              trace)
            return Advance(JobStatus.PROCESSING_CONVERSATIONS,
                           {**working, "conversation_id": conversation_id, "progress": int(Stage.CONVERSATION),
                            "message": "Asking Potpie's codebase agent the question..."})
        if step is Step.ASK_QUESTION:
            reply = self.agents.ask(job, analysis.question_of(job), trace)
            return Advance(JobStatus.PROCESSING_CONVERSATIONS,
                           {**working, "answer": reply.text, "agent_session": "",
                            "citations": reply.citations or analysis.cited_files(reply.text),
                            "progress": int(Stage.ANSWERED),
                            "message": "Answer received; asking for the structured analysis..."})
        if step is Step.ASK_STRUCTURED:
            reply = self.agents.ask(job, analysis.structured_prompt(job), trace)
            return Advance(JobStatus.PROCESSING_CONVERSATIONS,
                           {**working, "analysis_text": reply.text, "agent_session": "",
                            "progress": int(Stage.ANALYSED),
                            "message": "Structured analysis received; building the result..."})
        finished_at = now_iso()
        result = analysis.build_result(job, finished_at, int((time.time() - (job.created_ts or time.time())) * 1000))
        return End(JobStatus.FINISHED, {"result": result, "progress": int(Stage.FINISHED),
                                        "finished_at": finished_at, "message": MESSAGES[JobStatus.FINISHED]})

    def _retry_or_fail(self, job: Job, reason: str, retry_after: float | None) -> Advance | End:
        attempts = max(1, job.attempts)
        if attempts > self.settings.max_retries:
            return End(JobStatus.FAILED, {"failed_reason": f"{reason} (gave up after {attempts} attempts)"})
        delay = self.settings.retry_base_delay * 2 ** (attempts - 1) * random.uniform(1.0, 1.2)
        delay = min(max(delay, retry_after or 0.0), self.settings.broker_visibility_timeout / 2)
        update: JobUpdate = {"attempts": attempts + 1, "last_error": reason, "progress": job.progress,
                             "message": f"Attempt {attempts} of {self.settings.max_retries + 1} failed: {reason}. "
                                        f"Retrying in {delay:.1f} s."}
        if not job.attempts:
            update["processed_at"] = now_iso()
        return Advance(JobStatus.RETRYING, update, wait=delay, retry_in=delay)

    def _advance(self, job: Job, token: str, seq: int, change: Advance, keep: bool) -> bool:
        current = job.status
        if not can_move(current, change.status):
            log.error("refused transition %s -> %s", current.value, change.status.value, extra={"job_id": job.id})
            change = Advance(JobStatus.RETRYING, change.update, wait=self.settings.retry_base_delay)
        # Only progress within one state may be throttled; every retry is news (attempt, delay, error).
        progress_only = current is change.status and current is not JobStatus.RETRYING
        update: JobUpdate = {**change.update, "status": change.status, "seq": seq,
                             "next_due": time.time() + change.wait}
        if current is not change.status:
            update["status_since"] = time.time()  # when the job entered this state (metrics: time per state)
        previous, since = job.status, job.status_since
        job.apply(update)
        extra = retry_details(job, change.retry_in) if change.retry_in is not None else {}
        news = self.store.broadcast(job.id, [(STATUS_UPDATE, status_update(job, 0, **extra))])
        event_seq = self.store.commit(job.id, token, update, progress_only, keep_lease=keep, lease_s=self.lease_s,
                                      news=news)  # published by the commit itself, unless throttled
        if event_seq < 0:
            log.warning("lost the step lease; another delivery owns the job", extra={"job_id": job.id})
            return False
        if previous is not change.status:
            self.observe(Change(False, job, previous, since))
        if change.status is JobStatus.RETRYING:
            log.warning("attempt failed, retrying: %s", job.last_error, extra={"job_id": job.id})
        return True

    def _end(self, job: Job, token: str, change: End) -> None:
        update: JobUpdate = {"attempts": max(1, job.attempts), **change.update}
        if change.status is JobStatus.FAILED:
            update.setdefault("finished_at", now_iso())
            update.setdefault("message", update["failed_reason"])
            log.error("job failed: %s", update["failed_reason"], extra={"job_id": job.id})
        previous, since = job.status, job.status_since
        job.apply({**update, "status": change.status})
        news = self.store.broadcast(job.id, final_events(job, 0))
        seq, admitted = self.store.finish(job, token, change.status, update, news=news)
        if seq < 0:
            log.warning("could not end the job (lease lost or already ended)", extra={"job_id": job.id})
            return
        self.observe(Change(True, job, previous, since))
        for admitted_id in admitted:
            self.dispatch(admitted_id, 0, 0)
