"""The parse steps: pin the commit, start or follow Potpie's parse of it, and poll it until it is ready.

Potpie parses a repository again whenever it is asked while a parse runs, and its status route queues a long parse
a second time (shared/potpie/API-FACTS.md §8.1), so every job that needs the same project shares one parse
(store/flights.py) and polls go to the side-effect-free lookups of the Potpie client. Potpie reports no progress
while it parses: the job's progress is estimated from the time spent against recent parses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

from ..config import Settings
from ..core import analysis
from ..core.events import now_iso
from ..core.job import Job, JobUpdate
from ..core.model import MAX_POLLS_PER_SECOND, MESSAGES, JobStatus, Stage
from ..github import GitHubClient, GitHubError
from ..potpie.client import PotpieClient, Trace
from ..store.jobs import JobStore
from .outcomes import Advance, JobFailed
from ..store import StoreUnavailable

log = logging.getLogger(__name__)

WAIT_FOR_LEADER_S = 0.5  # how often a job whose parse another job is requesting looks for the project
UNPINNED = "; Potpie analyses the branch as it already holds it"


class PollLoad:
    """The parses this worker process polled Potpie for within the last POTPIE_POLL_INTERVAL, and so how far apart
    their polls must be for the process to send at most MAX_POLLS_PER_SECOND (analysis.poll_delay's `spacing`)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.polled: OrderedDict[str, float] = OrderedDict()  # parse -> when last polled, oldest first
        self.lock = threading.Lock()  # a threads pool polls from several threads

    def note(self, parse: str, now: float) -> None:
        with self.lock:
            self.polled.pop(parse, None)
            self.polled[parse] = now
            self._forget(now)

    def spacing(self, now: float) -> float:
        with self.lock:
            self._forget(now)
            return len(self.polled) / MAX_POLLS_PER_SECOND

    def _forget(self, now: float) -> None:
        while self.polled and next(iter(self.polled.values())) < now - self.window:
            self.polled.popitem(last=False)


class Parsing:
    """Runs the submit_parse and poll_parse steps of a job."""

    def __init__(self, settings: Settings, store: JobStore, potpie: PotpieClient, github: GitHubClient,
                 reveal_token: Callable[[str], str | None]) -> None:
        self.settings, self.store, self.potpie, self.github = settings, store, potpie, github
        self.reveal_token = reveal_token
        self.flights = store.flights
        self.ttl_s = settings.parse_timeout + 600  # a flight outlives the longest parse a job waits for
        self.load = PollLoad(settings.potpie_poll_interval)

    def submit(self, job: Job, working: JobUpdate, trace: Trace) -> Advance:
        """Join the parse of the job's project: follow one that is under way, wait for the job requesting it, or
        request it (looking it up first when an earlier request may have reached Potpie)."""
        working = {**working, **self._pin_commit(job)}
        key, now = self.flights.key(analysis.parse_identity(job)), time.time()
        joined = self.flights.join(key, job.id, now, claim_s=self.settings.step_lease, ttl_s=self.ttl_s)
        if joined.role == "follow":
            started: JobUpdate = {"potpie_project_id": joined.project_id, "parse_started_at": joined.started_at or now}
            return self._outcome(job, {**working, **started}, joined.status, joined.expected_s)
        if joined.role == "wait":
            return Advance(JobStatus.PARSING, {**working, "progress": max(job.progress, int(Stage.PARSING)),
                                               "message": "Waiting for the parse another job of this repository "
                                                          "requested"}, wait=WAIT_FOR_LEADER_S)
        try:
            found = None
            if job.parse_requested or joined.requested:  # an earlier request may have reached Potpie
                found = self.potpie.find_project(job.repo, job.branch, job.commit_id or None, trace)
            if found is None:
                self.store.mark(job.id, durable=True, parse_requested=True)  # kept across a failover
                job.parse_requested = True  # this run may go on to a retry of this step itself
                found = self.potpie.submit_parse(job.repo, job.branch, job.commit_id or None,
                                                 self._forwarded_token(job), trace)
        except BaseException:
            self._release(key, job.id)
            raise
        project_id, status = found
        answered = time.time()  # Potpie's parse started when it answered: polls keep their grid from here
        self.flights.publish(key, project_id, status, answered, self.ttl_s)
        return self._outcome(job, {**working, "potpie_project_id": project_id, "parse_started_at": answered}, status,
                             joined.expected_s)

    def poll(self, job: Job, working: JobUpdate, trace: Trace) -> Advance:
        """Read the parse's status: from the flight when another job polled it moments ago, else from Potpie."""
        started, now = job.parse_started_at or time.time(), time.time()
        key = self.flights.key(analysis.parse_identity(job))
        if now - started > self.settings.parse_timeout:
            self.flights.drop(key, now)  # its jobs share its start, so they give up too; later ones ask again
            raise JobFailed(f"Potpie did not finish parsing within PARSE_TIMEOUT ({self.settings.parse_timeout:g} s); "
                            f"last status: {job.parse_status}")
        delay = analysis.poll_delay(now - started, self.settings.potpie_poll_interval, self.load.spacing(now))
        turn = self.flights.poll_turn(key, now, max_age=delay, claim_s=min(self.settings.request_timeout, 30) + 5)
        status = turn.status
        if turn.action != "cached":
            self.load.note(key, now)
            status = self.potpie.parse_status(job.potpie_project_id, job.repo, job.branch, job.commit_id or None,
                                              trace)
            if turn.worth_recording(status):
                self.flights.record(key, status, time.time())
        return self._outcome(job, working, status, turn.expected_s)

    def _outcome(self, job: Job, update: JobUpdate, status: str, expected: float | None) -> Advance:
        """What a Potpie parse status means for the job: failed, ready (also straight from a parse request, when
        Potpie already holds the project), or still parsing, polled again after a delay that grows."""
        state = analysis.parse_state(status)
        if state is JobStatus.FAILED:
            raise JobFailed("Potpie could not parse the repository (status: error). Check that the repository "
                            "and branch exist and that Potpie can access them.")
        if state is JobStatus.READY:
            return Advance(JobStatus.READY, {**update, "parse_status": status, "parsed_at": now_iso(),
                                             "progress": int(Stage.READY), "progress_estimated": False,
                                             "message": MESSAGES[JobStatus.READY]})
        now = time.time()
        elapsed = now - float(update.get("parse_started_at") or job.parse_started_at or now)
        progress, estimated = analysis.parse_progress(status, job.progress, elapsed, expected)
        told = "" if not estimated else ", progress estimated from recent parses"
        return Advance(JobStatus.PARSING, {**update, "parse_status": status, "progress": progress,
                                           "progress_estimated": estimated,
                                           "message": f"Potpie is parsing the repository (status: {status}{told})"},
                       wait=analysis.poll_delay(elapsed, self.settings.potpie_poll_interval, self.load.spacing(now)))

    def _pin_commit(self, job: Job) -> JobUpdate:
        """Decide, once, which commit the job analyses: the request's, the branch head GitHub names (with the
        job's token or GITHUB_TOKEN), or none, saying why; the fields to commit with the step (every time: a
        decision a failed try did not commit is committed by the next). A head read from GitHub is also written at
        once, so a retry analyses the same commit. GitHub failing never fails the job."""
        if job.commit_source:
            return {"commit_id": job.commit_id, "commit_source": job.commit_source, "commit_note": job.commit_note}
        token, why = self._github_token(job)
        sha, note = "", why
        if token:
            try:
                sha = self.github.branch_head(job.repo, job.branch, token)
            except GitHubError as exc:
                note = f"not pinned to a commit: {exc}"
                log.warning("could not read the head of %s@%s from GitHub: %s", job.repo, job.branch, exc,
                            extra={"job_id": job.id})
        pin: JobUpdate = {"commit_id": sha, "commit_source": "github" if sha else "none",
                          "commit_note": note + UNPINNED if note else ""}
        if token:
            self.store.mark(job.id, **pin)
        job.apply(pin)
        return pin

    def _github_token(self, job: Job) -> tuple[str | None, str]:
        """The token that reads the branch head (the job's own, else GITHUB_TOKEN), or why there is none."""
        own = self.reveal_token(job.id) if job.has_github_token else None
        if own or self.settings.github_token:
            return own or self.settings.github_token, ""
        if job.has_github_token:
            return None, ("not pinned to a commit: the job's GitHub token could not be read (it expired, or "
                          "TOKEN_ENCRYPTION_KEY differs between the API and the worker)")
        return None, ("not pinned to a commit: no GitHub token to read the branch head (send github_token, or set "
                      "GITHUB_TOKEN)")

    def _forwarded_token(self, job: Job) -> str | None:
        """The GitHub token for `/parse`, only under POTPIE_FORWARD_GITHUB_TOKEN (a self-hosted Potpie that reads
        one): Potpie's own server has no such field, and a user's secret is not handed on for nothing."""
        if not self.settings.potpie_forward_github_token:
            return None
        if not job.has_github_token:
            return self.settings.github_token or None
        own = self.reveal_token(job.id)  # the job's own, never the operator's in its place (another identity)
        if own is None:
            raise JobFailed("the GitHub token could not be read: it expired, or TOKEN_ENCRYPTION_KEY differs "
                            "between the API and the worker")
        return own

    def _release(self, key: str, job_id: str) -> None:
        """Give up the lead after a failed request, so a waiting job need not wait out the claim."""
        try:
            self.flights.release(key, job_id, time.time())
        except StoreUnavailable:  # Redis away: the claim lapses by itself
            pass
