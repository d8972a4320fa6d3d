"""The agent's runs: each message goes to Potpie as a run of ours, under a `session_id` that names the job, and
a run the job no longer wants is stopped (`POST /conversations/{id}/stop`) before anything else happens.

A run goes on spending the account's credits after its caller stops listening: after a reply that timed out or was
cut off, before a retry asks again (when an earlier try left one going) and when the job is cancelled (the API
queues `stop_left`). A reply that came back empty or as a 500 ended on Potpie's side already.
"""

from __future__ import annotations

import logging
import uuid

from ..core.job import Job
from ..potpie.client import PotpieClient, PotpieError, Reply, TransientPotpieError, Trace
from ..store.jobs import JobStore

log = logging.getLogger(__name__)


class AgentRuns:
    """Asks the agent for a job, one run at a time, and stops the runs it leaves."""

    def __init__(self, store: JobStore, potpie: PotpieClient) -> None:
        self.store = store
        self.potpie = potpie

    def ask(self, job: Job, content: str, trace: Trace) -> Reply:
        """The agent's whole answer to `content`, asked as a new run (an earlier try's run stopped first)."""
        if job.agent_session and not self.stop(job, job.agent_session, trace):
            raise TransientPotpieError(f"an earlier run ({job.agent_session}) could not be stopped; not asking again "
                                       "while it may still run")  # its id is kept: the next try stops it first
        session = f"psvc-{job.id}-{trace.step}-a{trace.attempt}-{uuid.uuid4().hex[:8]}"
        self.store.mark(job.id, durable=True, agent_session=session)  # a cancel, or the next try, can stop it
        job.agent_session = session
        try:
            return self.potpie.send_message(job.conversation_id, content, session, trace)
        except TransientPotpieError as exc:
            if exc.reached and exc.status is None:  # timed out or cut off: the run may still be going on Potpie
                self.stop(job, session, trace)
            raise

    def stop(self, job: Job, session: str, trace: Trace) -> bool:
        """Stop run `session` of the job's conversation; False when Potpie could not be told (it may run on, and
        the job's next try stops it again)."""
        try:
            self.potpie.stop(job.conversation_id, session, trace)
        except PotpieError as exc:
            log.warning("could not stop agent run %s: %s", session, exc.reason, extra={"job_id": job.id})
            return False
        self.store.mark(job.id, agent_session="")
        job.agent_session = ""
        log.info("stopped agent run %s", session, extra={"job_id": job.id})
        return True

    def stop_left(self, job_id: str) -> str:
        """Stop the run a cancelled (or otherwise ended) job left in flight, if any."""
        job = self.store.get(job_id)
        if job is None or not job.agent_session or not job.conversation_id:
            return "no run in flight"
        trace = Trace(job.id, "stop", max(1, job.attempts))
        stopped = self.stop(job, job.agent_session, trace)
        self.store.mark(job.id, potpie_calls=trace.added_to(job.potpie_calls))
        return "stopped" if stopped else "not stopped"
