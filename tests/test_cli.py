"""The `analyze` CLI as a real subprocess against real API, worker, Redis and simulator processes."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import uuid
from typing import Iterator

import pytest

from potpie_service.auth import hash_key
from potpie_service.cli import Tracker, render_progress, summarize
from potpie_service.tokens import new_key
from tests.conftest import Stack, make_stack
from tests.stack import ROOT, free_port, start_api

pytestmark = pytest.mark.e2e  # whole stacks of processes: `make test` runs it, `make test-fast` does not

GITHUB_TOKEN = "ghp_" + "Zq9" * 12
CLIENT_KEY = "psk_cli_" + "k" * 24


def analyze(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `python -m potpie_service analyze ...` and capture its output."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("POTPIE_SERVICE_")}
    return subprocess.run([sys.executable, "-m", "potpie_service", "analyze", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**environ, **(env or {})})


def job_id_of(run: subprocess.CompletedProcess) -> str:
    found = re.search(r"^job ([0-9a-f]{32})$", run.stderr, re.M)
    assert found, run.stderr
    return found.group(1)


def repo(owner: str) -> str:
    return f"{owner}/cli-{uuid.uuid4().hex[:8]}"


def test_finished_job_prints_the_answer_and_exits_0(stack: Stack) -> None:
    run = analyze(repo("octocat"), "--url", stack.url, "--question", "What is it?")
    assert run.returncode == 0, run.stderr
    result = stack.status(job_id_of(run))["result"]
    assert run.stdout.startswith(result["answer"]) and "What is it?" in run.stdout
    assert "snippets: 3" in run.stdout and "files: src/app.py, src/service.py, tests/test_app.py" in run.stdout
    assert re.search(r"processing time: \d+\.\d s", run.stdout)
    lines = run.stderr.splitlines()  # not a terminal: one line per update
    assert any(re.match(r"\[#+-*\] +\d+% parsing  Potpie is parsing", line) for line in lines), run.stderr
    assert lines[-1].startswith("[" + "#" * 20 + "] 100% finished"), run.stderr


def test_failed_job_prints_the_reason_and_exits_1(stack: Stack) -> None:
    run = analyze(repo("parse-error"), "--url", stack.url)
    assert run.returncode == 1, run.stderr
    assert "analysis failed: Potpie could not parse the repository" in run.stderr
    assert run.stdout == ""


def test_json_prints_the_final_event(stack: Stack) -> None:
    run = analyze(repo("octocat"), "--url", stack.url, "--json")
    assert run.returncode == 0, run.stderr
    final = json.loads(run.stdout)
    assert final["event"] == "analysis_complete" and final["status"] == "finished"
    assert final["data"] == stack.status(final["job_id"])["result"]
    failed = analyze(repo("parse-error"), "--url", stack.url, "--json")
    assert failed.returncode == 1 and json.loads(failed.stdout)["event"] == "analysis_error"


def test_follow_an_existing_job(stack: Stack) -> None:
    done = stack.submit(repo("octocat"))["job_id"]
    stack.wait_final(done)
    run = analyze("--follow", done, "--url", stack.url, "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["data"] == stack.status(done)["result"]
    unknown = analyze("--follow", "0" * 32, "--url", stack.url)
    assert unknown.returncode == 2 and "Job not found" in unknown.stderr


def test_reconnects_and_rejoins_after_the_api_restarts(stack: Stack) -> None:
    api = start_api(stack.env, "cli-api-restart")
    try:
        port = int(api.url.rsplit(":", 1)[1])  # type: ignore[attr-defined]
        proc = subprocess.Popen([sys.executable, "-m", "potpie_service", "analyze", repo("slow-parse"), "--url",
                                 api.url, "--json"], cwd=ROOT, stdout=subprocess.PIPE,  # type: ignore[attr-defined]
                                stderr=subprocess.PIPE, text=True)
        seen = []
        for line in proc.stderr:  # type: ignore[union-attr]
            seen.append(line)
            if "% parsing" in line:
                break
        job_id = job_id_of(subprocess.CompletedProcess([], 0, "", "".join(seen)))
        api.kill()
        assert stack.wait_final(job_id)["status"] == "finished"  # it ends while the CLI's API is down
        api = start_api(stack.env, "cli-api-restarted", port=port)
        out, err = proc.communicate(timeout=30)
    finally:
        api.stop()
    assert proc.returncode == 0, "".join(seen) + err
    assert json.loads(out)["data"] == stack.status(job_id)["result"]


@pytest.mark.parametrize("args", [[], ["a/b", "--follow", "0" * 32], ["a/b", "--timeout", "-1"], ["a/b", "--nope"]])
def test_bad_usage_exits_2(args: list[str]) -> None:
    run = analyze(*args, "--url", "http://127.0.0.1:9")
    assert run.returncode == 2 and "usage:" in run.stderr


def test_refused_job_names_the_field_and_exits_2(stack: Stack) -> None:
    run = analyze("not a repo", "--url", stack.url)
    assert run.returncode == 2 and "HTTP 400" in run.stderr and "[field: repo]" in run.stderr
    # the default stack has no TOKEN_ENCRYPTION_KEY: the token is refused, and not echoed
    run = analyze(repo("octocat"), "--url", stack.url, "--token", GITHUB_TOKEN)
    assert run.returncode == 2 and "[field: github_token]" in run.stderr
    assert GITHUB_TOKEN not in run.stdout + run.stderr


def test_unreachable_service_exits_2_with_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["octocat/Hello-World"], ["--follow", "a" * 32]):
        run = analyze(*args, "--url", url, env={"POTPIE_SERVICE_URL": "http://unused.invalid"})
        assert run.returncode == 2
        message = [line for line in run.stderr.splitlines() if not line.startswith("job ")]
        assert len(message) == 1 and url in message[0] and "Traceback" not in run.stderr, run.stderr


@pytest.fixture(scope="module")
def secure_stack(redis_server, simulator) -> Iterator[Stack]:
    """Tokens accepted (TOKEN_ENCRYPTION_KEY), API keys required, one cross origin allowed."""
    running = make_stack(redis_server, simulator, "cli-secure", TOKEN_ENCRYPTION_KEY=new_key(), AUTH_DISABLED="false",
                         API_KEYS=f"cli:{hash_key(CLIENT_KEY)}", CORS_ORIGINS="https://app.example")
    yield running
    running.stop()


def test_token_and_key_are_never_printed_logged_or_stored_in_clear(secure_stack: Stack) -> None:
    env = {"POTPIE_SERVICE_URL": secure_stack.url, "POTPIE_SERVICE_API_KEY": CLIENT_KEY}
    run = analyze(repo("octocat"), "--token", GITHUB_TOKEN, "--json", env=env)
    assert run.returncode == 0, run.stderr
    final = json.loads(run.stdout)
    assert final["data"]["metadata"]["has_github_token"] is True
    for text in (run.stdout, run.stderr, secure_stack.api.log(), *(w.log() for w in secure_stack.workers)):
        assert GITHUB_TOKEN not in text and CLIENT_KEY not in text
    client = secure_stack.redis.client()
    for key in client.scan_iter(secure_stack.key("*")):
        kind = client.type(key)
        value = client.hgetall(key) if kind == "hash" else client.get(key) if kind == "string" else ""
        assert GITHUB_TOKEN not in json.dumps(value), key
    wrong = analyze(repo("octocat"), "--token", GITHUB_TOKEN, env={**env, "POTPIE_SERVICE_API_KEY": "psk_wrong"})
    assert wrong.returncode == 2 and "HTTP 401" in wrong.stderr
    assert GITHUB_TOKEN not in wrong.stdout + wrong.stderr and "psk_wrong" not in wrong.stderr


def test_terminal_gets_one_rewritten_progress_line(stack: Stack) -> None:
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "potpie_service", "analyze", repo("octocat"), "--url", stack.url],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    out, _ = proc.communicate(timeout=60)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the other end closed: all read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    screen = b"".join(chunks).decode()
    assert proc.returncode == 0 and out
    assert screen.count("\r[") >= 3 and "100% finished" in screen
    assert screen.count("\n") <= 3, "progress rewrites one line on a terminal"


def test_render_progress_and_summary_and_seq_dedup() -> None:
    assert render_progress("parsing", 45, "hello", 80) == "[#########-----------]  45% parsing  hello"
    assert render_progress("queued", -5, "x", 80).startswith("[--------------------]   0%")
    assert render_progress("finished", 250, "x", 80).startswith("[" + "#" * 20 + "] 100%")
    assert len(render_progress("parsing", 10, "m" * 500, 60)) == 60
    lines = summarize({"answer": "A", "snippets_count": 5, "metadata": {"processing_time_ms": 1234},
                       "snippets": [{"file_path": f"f{i}.py"} for i in range(5)]})
    assert lines == ["A", "", "snippets: 5", "files: f0.py, f1.py, f2.py (+2 more)", "processing time: 1.2 s"]
    tracker = Tracker()
    assert tracker.accept("status_update", {"seq": 0, "status": "queued"})
    assert not tracker.accept("status_update", {"seq": 0, "status": "queued"}), "a replay of a seen seq is dropped"
    assert tracker.accept("status_update", {"seq": 2, "status": "finished"})
    assert not tracker.accept("status_update", {"seq": 1, "status": "parsing"}), "older than the newest: dropped"
    assert not tracker.done.is_set()
    assert tracker.accept("analysis_complete", {"seq": 3, "status": "finished"}) and tracker.done.is_set()
    assert not tracker.accept("analysis_complete", {"seq": 3}) and tracker.final[1]["seq"] == 3
