"""The cluster-wide metrics: their names, kinds, labels and buckets, and the failure classes of failed jobs."""

from __future__ import annotations

from dataclasses import dataclass

JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
STATE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 15, 30, 60, 300, 900, 3600)
CALL_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# failed_reason texts (pipeline.py, potpie.py) -> failure class; the first match wins, the rest is "other".
FAILURE_CLASSES = (
    ("internal", "internal error in "),
    ("retries_exhausted", "(gave up after "),
    ("potpie_auth", "Potpie rejected the API key"),
    ("potpie_auth", "Potpie denied access"),
    ("potpie_usage_limit", "Potpie usage limit reached"),
    ("parse_error", "Potpie could not parse the repository"),
    ("parse_timeout", "Potpie did not finish parsing within PARSE_TIMEOUT"),
    ("github_token", "the GitHub token could not be read"),
    ("potpie_agent", "POTPIE_AGENT_ID="),
    ("potpie_rejected", "Potpie "),
)
KNOWN_CLASSES = tuple(dict.fromkeys([name for name, _ in FAILURE_CLASSES] + ["other"]))


@dataclass(frozen=True)
class Family:
    """A cluster-wide metric kept in Redis."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


FAMILIES = {f.name: f for f in (
    Family("potpie_jobs_finished_total", "counter", "Jobs that finished with a result."),
    Family("potpie_jobs_failed_total", "counter", "Jobs that failed for good, by failure class.", ("failure_class",)),
    Family("potpie_jobs_cancelled_total", "counter", "Jobs cancelled by their owner (DELETE /jobs/<id>)."),
    Family("potpie_job_retries_total", "counter", "Job-level retries scheduled (moves into the retrying state)."),
    Family("potpie_job_duration_seconds", "histogram", "Job time from submission to its end, by final status.",
           ("status",), JOB_BUCKETS),
    Family("potpie_job_state_duration_seconds", "histogram", "Time a job spent in a state, observed as it left it.",
           ("state",), STATE_BUCKETS),
    Family("potpie_upstream_request_duration_seconds", "histogram",
           "Potpie API calls (each try), by endpoint and HTTP status or error.", ("endpoint", "status"), CALL_BUCKETS),
    Family("potpie_upstream_errors_total", "counter", "Potpie API calls that failed, by endpoint and status.",
           ("endpoint", "status")),
)}


def failure_class(reason: str) -> str:
    """The failure class of a job's failed_reason (a bounded label value)."""
    for name, text in FAILURE_CLASSES:
        if text in reason:
            return name
    return "other"


def bucket(buckets: tuple[float, ...], value: float) -> str:
    """The bucket bound (le) an observation falls in."""
    return next((f"{bound:g}" for bound in buckets if value <= bound), "+Inf")
