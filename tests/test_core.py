"""The pure core and the settings: analysis decisions, JSON extraction, validation rules, configuration."""

from __future__ import annotations

import subprocess
import sys

import pytest

from potpie_service.core import analysis, replies, submission
from potpie_service.core.analysis import Step
from potpie_service.core.errors import ValidationError
from potpie_service.core.submission import analyze_request, check_branch, check_repo
from potpie_service.config import ConfigError, Settings
from potpie_service.core.job import Job, to_hash
from potpie_service.core.model import JobStatus, can_move
from tests.stack import ROOT


def test_next_step_follows_what_the_job_already_holds() -> None:
    job = Job("j")
    assert analysis.next_step(job) is Step.SUBMIT_PARSE
    job.apply({"potpie_project_id": "p", "parse_status": "cloned"})
    assert analysis.next_step(job) is Step.POLL_PARSE
    job.parse_status = "ready"
    assert analysis.next_step(job) is Step.CREATE_CONVERSATION
    job.conversation_id = "c"
    assert analysis.next_step(job) is Step.ASK_QUESTION
    job.answer = ""  # an empty answer is still an answer: do not ask twice
    assert analysis.next_step(Job.from_hash(job.to_hash())) is Step.ASK_STRUCTURED  # also once stored and read
    job.analysis_text = "{}"
    assert analysis.next_step(job) is Step.FINISH


def test_the_job_record_survives_the_hash_field_by_field() -> None:
    job = Job("j", owner="alice", status=JobStatus.RETRYING, progress=30, created_ts=1.5, has_github_token=True,
              history=["a", "b"], citations=["x.py"], result={"k": [1]}, answer="", parse_requested=True)
    raw = job.to_hash()
    assert raw["status"] == "retrying" and raw["has_github_token"] == "1" and raw["history"] == '["a", "b"]'
    assert "analysis_text" not in raw, "None is not written: it stays 'not asked yet'"
    assert Job.from_hash(raw) == job
    assert Job.from_hash({"id": "j", "ticket": "7"}) == Job("j"), "the store's own fields are left out"
    with pytest.raises(KeyError, match="no field 'stauts'"):
        to_hash({"stauts": "queued"})


# Parse status sequences Potpie's code can produce (API-FACTS §3): the February, June and August builds, a parse
# request answered `ready` (already parsed) or `inferring` (in progress), a re-parse going back to `submitted`,
# `processing` (in the enum, never written), a status Potpie may add later, and `error` at any point.
POTPIE_SEQUENCES = [
    ["submitted", "cloned", "parsed", "inferring", "ready"], ["submitted", "parsed", "inferring", "ready"],
    ["submitted", "ready"], ["ready"], ["inferring", "ready"], ["inferring", "submitted", "cloned", "ready"],
    ["created", "processing", "ready"], ["submitted", "indexing", "ready"], ["submitted", "cloned", "error"],
    ["parsed", "error"], ["error"],
]


@pytest.mark.parametrize("sequence", POTPIE_SEQUENCES, ids="-".join)
@pytest.mark.parametrize("start", [JobStatus.QUEUED, JobStatus.RETRYING])
def test_every_parse_sequence_potpie_produces_is_an_allowed_path(start: JobStatus, sequence: list[str]) -> None:
    current = start  # a new job, or one resumed by a job-level retry
    for status in sequence:
        state = analysis.parse_state(status)
        assert can_move(current, state), f"{current.value} -> {state.value} ({status})"
        current = state
    assert current in (JobStatus.READY, JobStatus.FAILED)
    assert can_move(current, JobStatus.PROCESSING_CONVERSATIONS) or current is JobStatus.FAILED
    assert all(can_move(state, JobStatus.RETRYING) for state in (JobStatus.PARSING, JobStatus.READY))


def test_parse_progress_is_estimated_while_potpie_says_nothing_and_never_moves_back() -> None:
    progress, seen = 10, []
    for elapsed in (0, 1, 5, 20, 60, 120, 600, 3600):
        progress, estimated = analysis.parse_progress("submitted", progress, elapsed, expected=60.0)
        assert estimated is True
        seen.append(progress)
    assert seen == sorted(seen) and seen[0] == 15 and seen[-1] == 59, seen  # short of ready's 65, never 60
    assert analysis.parse_progress("submitted", 30, 1, 60.0) == (30, True), "never backwards"
    assert analysis.parse_progress("submitted", 10, 30, 10.0)[0] > analysis.parse_progress("submitted", 10, 30, 60.0)[0]
    assert analysis.parse_progress("submitted", 10, 30, None) == analysis.parse_progress("submitted", 10, 30, 60.0)
    # an older server's walk says how far it is: that stage, not an estimate
    assert analysis.parse_progress("cloned", 10, 0, None) == (30, False)
    assert analysis.parse_progress("inferring", 40, 500, 60.0) == (55, False)
    assert analysis.parse_progress("a-status-potpie-adds", 10, 30, 60.0)[1] is True


def test_polls_start_soon_and_space_out_with_the_parse_age_to_the_interval_grid() -> None:
    def schedule(interval: float = 5.0, until: float = 120.0) -> list[float]:
        polls, elapsed = [], 0.0
        while elapsed < until:
            elapsed += analysis.poll_delay(elapsed, interval)
            polls.append(round(elapsed, 3))
        return polls

    polls = schedule()
    assert polls[:3] == [0.25, 0.75, 1.25], "a quick parse is seen at once"
    gaps = [later - earlier for earlier, later in zip(polls, polls[1:])]
    # a parse that ends just after a poll waits at most the next gap: <= 0.5 s, or 7% of its age
    for at, gap in zip(polls, gaps):
        assert gap <= max(0.5, 0.07 * at) + 1e-3 or at >= 5.0 / 0.07, (at, gap)  # polls are rounded to ms
    # the gap reaches the interval at 71 s; from there polls keep to the interval's grid from the parse's start
    assert [p for p in polls if p > 75] == [80.0, 85.0, 90.0, 95.0, 100.0, 105.0, 110.0, 115.0, 120.0]
    first_minute = len([p for p in polls if p <= 60])
    assert first_minute == 46, f"{first_minute} polls in the first minute"  # a fixed 5 s interval: 12
    assert analysis.poll_delay(0, 0.1) == 0.1, "an interval shorter than the first poll is kept"
    assert analysis.poll_delay(3.0, 0.1) == pytest.approx(0.1)  # on the grid


def test_a_loaded_poller_spaces_its_polls_on_a_grid_no_wider_than_the_interval() -> None:
    def schedule(spacing: float, until: float = 30.0) -> list[float]:
        polls, elapsed = [], 0.0
        while elapsed < until:
            elapsed += analysis.poll_delay(elapsed, 5.0, spacing)
            polls.append(round(elapsed, 3))
        return polls

    assert schedule(0.0) == schedule(0.4), "a spacing below the gaps changes nothing"
    # 1,000 parses at 100 polls a second: 10 s apart, but never wider than the interval: a fixed interval's polls
    assert schedule(10.0) == [0.25, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0]
    # 200 parses: on a 2 s grid while the parse-age gap is narrower (to 28.6 s), then the gap (7% of the age)
    polls = schedule(2.0, until=40.0)
    assert polls[:5] == [0.25, 2.0, 4.0, 6.0, 8.0] and polls[14:18] == [28.0, 30.0, 32.1, 34.347]
    gaps = [later - earlier for earlier, later in zip(polls, polls[1:])]
    assert all(gap <= max(2.0, 0.07 * at) + 1e-3 for at, gap in zip(polls, gaps)), "the tighter of the two rules"


def test_jobs_share_a_parse_when_potpie_would_find_the_same_project() -> None:
    assert analysis.parse_identity(Job("a", repo="o/r", branch="main")) == \
        analysis.parse_identity(Job("b", repo="o/r", branch="main", question="other"))
    assert analysis.parse_identity(Job("a", repo="o/r", branch="main")) != \
        analysis.parse_identity(Job("a", repo="O/r", branch="main"))  # Potpie does not normalise names
    # with a commit Potpie finds the project by it, whatever the branch
    assert analysis.parse_identity(Job("a", repo="o/r", branch="x", commit_id="abc1234")) == \
        analysis.parse_identity(Job("b", repo="o/r", branch="y", commit_id="abc1234"))


def test_only_the_agents_words_are_kept() -> None:
    assert replies.agent_words(replies.SETUP_BANNER + "Here is it.") == "Here is it."
    assert replies.agent_words("Here is it.") == "Here is it."
    assert replies.agent_words("A \u23f3 later, please wait... is text") == "A \u23f3 later, please wait... is text"
    assert replies.join_chunks([replies.SETUP_BANNER, "Hel", "", "[[SUBAGENT_ERROR]]\nThe operation could not be "
                                "completed.", "lo"]) == "Hello"
    assert replies.join_chunks([replies.SETUP_BANNER]) == "" and replies.is_status_chunk(replies.SETUP_BANNER)
    assert not replies.is_status_chunk("") and not replies.is_status_chunk(" ")


def test_cited_files_are_the_paths_an_answer_names() -> None:
    text = "Start at src/app.py, then src/service.py. See tests/test_app.py: v1.2 is e.g. a version; a/b is not."
    assert analysis.cited_files(text) == ["src/app.py", "src/service.py", "tests/test_app.py"]
    assert analysis.cited_files("nothing here") == []


def test_commit_id_is_a_sha_of_7_to_40_hex_digits() -> None:
    assert submission.analyze_request({"repo": "o/r", "commit_id": "ABCDEF1"}).commit_id == "abcdef1"
    assert submission.analyze_request({"repo": "o/r"}).commit_id is None
    for bad in ("abc12", "g" * 7, "a" * 41, "main", 7):
        with pytest.raises(ValidationError) as info:
            submission.analyze_request({"repo": "o/r", "commit_id": bad})
        assert info.value.details["field"] == "commit_id"


@pytest.mark.parametrize("text, expected", [
    ('Here:\n```json\n{"overview": "x", "snippets": []}\n```\nbye', {"overview": "x", "snippets": []}),
    ('prose {"a": 1} more {"b": 2}', {"a": 1}),
    ('```\n{"a": {"b": [1, 2]}}\n```', {"a": {"b": [1, 2]}}),
    ('broken ```json\n{"a": 1,}\n``` then {"ok": true}', {"ok": True}),
    ("no json at all", None),
    ("[1, 2, 3]", None),
])
def test_extract_json_finds_the_first_object(text: str, expected: object) -> None:
    assert analysis.extract_json(text) == expected


def test_build_result_normalises_snippets_and_keeps_raw_text_when_unparseable() -> None:
    job = Job("j", repo="o/r", branch="main", question="", answer="A", citations=["a.py"], attempts=2,
              analysis_text='```json\n{"overview": "o", "snippets": [{"file_path": "a.py", "line_start": "3", '
                            '"line_end": 1, "tags": "x"}, {"no": "path"}]}\n```')
    result = analysis.build_result(job, "t", 5)
    assert result["snippets"] == [{"node_id": "a.py:3-1", "file_path": "a.py", "line_start": 3, "line_end": 3,
                                   "tags": [], "description": ""}]
    assert result["snippets_count"] == 1 and result["analysis_response"] == {"overview": "o"}
    assert result["question"] == analysis.DEFAULT_QUESTION and result["metadata"]["attempts"] == 2
    broken = analysis.build_result(job.apply({"analysis_text": "sorry, no"}), "t", 5)
    assert broken["analysis_response"]["raw_text"] == "sorry, no" and broken["snippets_count"] == 0


def test_eta_from_recent_durations() -> None:
    assert analysis.eta_seconds(JobStatus.QUEUED, 3, None, [], 2, 100.0) is None
    assert analysis.eta_seconds(JobStatus.QUEUED, 3, None, [10.0, 20.0], 2, 100.0) == 45.0  # 2 rounds + its own
    assert analysis.eta_seconds(JobStatus.PARSING, None, 95.0, [10.0], 2, 100.0) == 5.0
    assert analysis.eta_seconds(JobStatus.FINISHED, None, 95.0, [10.0], 2, 100.0) is None


@pytest.mark.parametrize("repo", ["octocat/Hello-World", "a/b", "my-org/repo.name_2", "A1/x.y-z"])
def test_valid_repos(repo: str) -> None:
    assert check_repo(repo) == repo


@pytest.mark.parametrize("repo", ["", "noslash", "-bad/x", "bad-/x", "a--b/x" * 0 + "o/..", "o/x.git",
                                  "o/x y", "o/<script>", "o" * 40 + "/x", "o/" + "x" * 101, "../x", "o/r/extra"])
def test_invalid_repos(repo: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_repo(repo)
    assert info.value.details["field"] == "repo"


@pytest.mark.parametrize("branch", ["main", "feature/x", "release-1.2", "v1.0.0", "a_b"])
def test_valid_branches(branch: str) -> None:
    assert check_branch(branch) == branch


@pytest.mark.parametrize("branch", ["", "a..b", "a b", "a~1", "a^", "a:b", "a?", "a*", "a[", "a\\b", "/a",
                                    "a/", "a.lock", "a/.b", ".a", "a@{1}", "@", "a//b", "-a", "x" * 256])
def test_invalid_branches(branch: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_branch(branch)
    assert info.value.details["field"] == "branch"


@pytest.mark.parametrize("body, field", [
    ({"repo": 5}, "repo"), ({"repo": "a/b", "branch": ["x"]}, "branch"), ({"repo": "a/b", "question": 1}, "question"),
    ({"repo": "a/b", "question": "x" * 4001}, "question"), ({"repo": "a/b", "github_token": "tok en"}, "github_token"),
    ({"repo": "a/b", "extra": 1}, "extra"), ({"repo": "a/b", "callback_url": "ftp://x"}, "callback_url"),
])
def test_analyze_request_names_the_bad_field(body: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        analyze_request(body)
    assert info.value.details["field"] == field


def test_redis_db_zero_stays_zero_and_url_wins() -> None:
    assert Settings.from_env({"REDIS_DB": "0"}).redis_url.endswith("/0")
    parts = Settings.from_env({"REDIS_HOST": "h", "REDIS_PORT": "7000", "REDIS_DB": "3", "REDIS_PASSWORD": "p@s:s",
                               "REDIS_USERNAME": "u", "REDIS_TLS_ENABLED": "true"})
    assert parts.redis_url == "rediss://u:p%40s%3As@h:7000/3" and parts.redis_tls
    assert Settings.from_env({"REDIS_URL": "redis://x:1/2", "REDIS_HOST": "h"}).redis_url == "redis://x:1/2"


def test_every_bad_value_is_named_at_once_and_secrets_are_hidden() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"PORT": "80a", "REDIS_TLS_ENABLED": "maybe", "REDIS_URL": "http://secret@x",
                           "MAX_CONCURRENT_JOBS": "0", "TOKEN_ENCRYPTION_KEY": "short", "ACCESS_LOG": "sometimes"})
    message = str(info.value)
    assert "ACCESS_LOG='sometimes': expected one of all, errors, off" in message
    for name in ("PORT", "REDIS_TLS_ENABLED", "REDIS_URL", "MAX_CONCURRENT_JOBS", "TOKEN_ENCRYPTION_KEY"):
        assert name in message
    assert "secret@x" not in message


def test_sentinels_win_over_redis_url_and_each_client_is_built_for_them() -> None:
    from potpie_service.connections import broker_url, make_redis, socketio_manager_args, where
    from potpie_service.queue import make_celery

    settings = Settings.from_env({"REDIS_SENTINELS": "s1:26379,s2:26380,s3", "REDIS_URL": "redis://old:1/0",
                                  "REDIS_PASSWORD": "p@ss", "REDIS_DB": "2", "REDIS_SENTINEL_PASSWORD": "sp"})
    assert settings.redis_sentinels == (("s1", 26379), ("s2", 26380), ("s3", 26379))
    assert "old" not in where(settings) and "mymaster" in where(settings)
    assert broker_url(settings) == ("sentinel://:p%40ss@s1:26379/2;sentinel://:p%40ss@s2:26380/2;"
                                    "sentinel://:p%40ss@s3:26379/2")
    app = make_celery(settings)
    conf = app.conf
    assert type(app.connection_for_write().transport).__name__ == "SentinelTransport"
    assert conf.broker_transport_options["master_name"] == "mymaster"
    assert conf.broker_transport_options["sentinel_kwargs"]["password"] == "sp"
    url, options = socketio_manager_args(settings)
    assert url == "redis+sentinel://s1:26379,s2:26380,s3:26379/2/mymaster" and "p@ss" not in url
    assert options["password"] == "p@ss" and options["db"] == 2 and options["sentinel_kwargs"]["password"] == "sp"
    client = make_redis(settings)
    pool = client.connection_pool
    assert pool.service_name == "mymaster" and pool.max_connections == settings.redis_max_connections
    assert pool.connection_kwargs["password"] == "p@ss" and pool.connection_kwargs["db"] == 2
    assert [s.connection_pool.connection_kwargs["password"] for s in pool.sentinel_manager.sentinels] == ["sp"] * 3
    plain = Settings.from_env({"REDIS_URL": "redis://x:1/2"})
    assert broker_url(plain) == "redis://x:1/2"
    assert type(make_celery(plain).connection_for_write().transport).__module__ == "potpie_service.kombu_redis"


@pytest.mark.parametrize("env, named", [
    ({"REDIS_SENTINELS": "host:port"}, "REDIS_SENTINELS='host:port'"),
    ({"REDIS_SENTINELS": "[::1]:26379"}, "REDIS_SENTINELS='[::1]:26379'"),
    ({"REDIS_SENTINEL_PASSWORD": "x"}, "REDIS_SENTINEL_PASSWORD is set but REDIS_SENTINELS is not"),
    ({"REDIS_SENTINEL_MASTER": "other"}, "REDIS_SENTINEL_MASTER is set but REDIS_SENTINELS is not"),
    ({"REDIS_SENTINELS": "s:1", "REDIS_URL": "rediss://x:1/0"}, "set REDIS_TLS_ENABLED=true"),
    ({"REDIS_MIN_REPLICAS_ACK": "-1"}, "REDIS_MIN_REPLICAS_ACK"),
])
def test_a_bad_sentinel_combination_is_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_visibility_timeout_must_exceed_the_task_time_limit() -> None:
    with pytest.raises(ConfigError, match="BROKER_VISIBILITY_TIMEOUT"):
        Settings.from_env({"BROKER_VISIBILITY_TIMEOUT": "100", "REQUEST_TIMEOUT": "60000"})


@pytest.mark.parametrize("command", [[sys.executable, "-m", "potpie_service", "api"],
                                     [sys.executable, "-m", "celery", "-A", "workers", "worker"]])
def test_bad_configuration_stops_start_up_with_one_line(command: list[str]) -> None:
    env = {"PATH": "/usr/bin:/bin", "PORT": "eighty", "AUTH_DISABLED": "true"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "PORT='eighty': expected a whole number" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_env_example_documents_every_variable() -> None:
    from dataclasses import fields

    documented = (ROOT / ".env.example").read_text()
    missing = [f.metadata["env"] for f in fields(Settings) if f"\n{f.metadata['env']}=" not in documented]
    assert missing == []


def test_a_job_update_is_typed_with_every_field_of_job_but_its_id() -> None:
    from dataclasses import fields

    from potpie_service.core.job import JobUpdate

    declared = {f.name: str(f.type).removesuffix(" | None") for f in fields(Job) if f.name != "id"}
    assert set(JobUpdate.__annotations__) == set(declared), "JobUpdate and Job list different fields"
    updates = {name: getattr(kind, "__forward_arg__", str(kind))  # None is never written: no "| None" here
               for name, kind in JobUpdate.__annotations__.items()}
    assert updates == declared


def test_mypy_refuses_a_misspelt_or_mistyped_job_update(tmp_path) -> None:
    snippet = tmp_path / "update.py"
    snippet.write_text("from potpie_service.core.job import JobUpdate\n"
                       "misspelt: JobUpdate = {'progres': 5}\n"
                       "mistyped: JobUpdate = {'progress': 'five'}\n"
                       "fine: JobUpdate = {'progress': 5, 'message': 'ok'}\n")
    checked = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent",
                              str(snippet)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert 'Extra key "progres" for TypedDict "JobUpdate"' in checked.stdout, checked.stdout
    assert 'TypedDict item "progress" has type "int"' in checked.stdout, checked.stdout
    assert checked.stdout.count("error:") == 2, checked.stdout
