"""`python -m potpie_service analyze`: submit a job (or follow one) and watch it live over Socket.IO."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any, Callable, TextIO

import requests
import socketio

FINAL_EVENTS = ("analysis_complete", "analysis_error")
EVENTS = ("status_update", *FINAL_EVENTS)
DEFAULT_URL = "http://localhost:8080"


class UsageError(Exception):
    """The service cannot be reached or refused the request (exit 2); the message is safe to print."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; argparse exits 2 on bad usage."""
    parser = argparse.ArgumentParser(prog="python -m potpie_service analyze",
                                     description="Analyse a GitHub repository and follow the job live.")
    parser.add_argument("repo", nargs="?", help="OWNER/REPO (omit with --follow)")
    parser.add_argument("--branch", default="main")
    parser.add_argument("--commit", help="the commit to analyse (7-40 hex digits; default: the branch head)")
    parser.add_argument("--question", default="")
    parser.add_argument("--token", help="GitHub token: pins the branch head (never printed, not sent to Potpie)")
    parser.add_argument("--url", default=os.environ.get("POTPIE_SERVICE_URL", DEFAULT_URL))
    parser.add_argument("--api-key", default=os.environ.get("POTPIE_SERVICE_API_KEY"))
    parser.add_argument("--json", action="store_true", help="print the final event as JSON on stdout")
    parser.add_argument("--follow", metavar="JOB_ID", help="follow an existing job instead of submitting one")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after S seconds (default 3600)")
    args = parser.parse_args(argv)
    if bool(args.repo) == bool(args.follow):
        parser.error("give either OWNER/REPO or --follow JOB_ID")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    args.url = args.url.rstrip("/")
    return args


def render_progress(status: str, progress: int, message: str, width: int = 80) -> str:
    """One progress line, `[#####-----]  45% parsing  message`, cut to `width` characters."""
    progress = max(0, min(100, int(progress)))
    bar_width = 20
    filled = bar_width * progress // 100
    line = f"[{'#' * filled}{'-' * (bar_width - filled)}] {progress:3d}% {status}  {message}"
    return line if len(line) <= width else line[: max(width - 3, 0)] + "..."


def summarize(data: dict[str, Any], files: int = 3) -> list[str]:
    """The answer and a short summary of a finished job's result."""
    snippets = data.get("snippets") or []
    paths = list(dict.fromkeys(s.get("file_path") for s in snippets if s.get("file_path")))
    paths = paths or list(data.get("citations") or [])
    shown = ", ".join(paths[:files]) + (f" (+{len(paths) - files} more)" if len(paths) > files else "")
    millis = (data.get("metadata") or {}).get("processing_time_ms")
    lines = [str(data.get("answer") or "(no answer)"), "",
             f"snippets: {data.get('snippets_count', len(snippets))}", f"files: {shown or '-'}"]
    if isinstance(millis, (int, float)):
        lines.append(f"processing time: {millis / 1000:.1f} s")
    return lines


def scrub(text: str, secret: str | None) -> str:
    """The text with the secret replaced, so no message can leak it."""
    return text.replace(secret, "***") if secret else text


class Tracker:
    """Keeps the newest event per seq (drops replays and duplicates) and remembers the final one."""

    def __init__(self) -> None:
        self.last_seq = -1
        self.final: tuple[str, dict[str, Any]] | None = None
        self.done = threading.Event()

    def accept(self, event: str, payload: Any) -> bool:
        """Whether the event is new; the final event (or a cancelled status) ends the wait."""
        seq = payload.get("seq") if isinstance(payload, dict) else None
        if not isinstance(seq, int) or seq <= self.last_seq:
            return False
        self.last_seq = seq
        if event in FINAL_EVENTS or (event == "status_update" and payload.get("status") == "cancelled"):
            self.final = (event, payload)
            self.done.set()
        return True


class Display:
    """Progress on stderr: one rewritten line on a terminal, a line per change otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def show(self, payload: dict[str, Any]) -> None:
        """Draw a status_update."""
        width = self._width() if self.tty else 160
        line = render_progress(str(payload.get("status")), payload.get("progress") or 0,
                               str(payload.get("message") or ""), width)
        if line != self.last:
            self.stream.write(f"\r{line:<{width}}" if self.tty else line + "\n")
            self.stream.flush()
            self.last = line

    def _width(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        return columns - 1 if columns >= 20 else 100

    def close(self) -> None:
        """End the rewritten line."""
        if self.tty and self.last:
            self.stream.write("\n")


def submit(args: argparse.Namespace, headers: dict[str, str]) -> str:
    """POST /analyze; return the job id."""
    body = {"repo": args.repo, "branch": args.branch, "question": args.question}
    if args.commit:
        body["commit_id"] = args.commit
    if args.token:
        body["github_token"] = args.token
    try:
        response = requests.post(f"{args.url}/analyze", json=body, headers=headers, timeout=30)
    except requests.RequestException as exc:
        raise UsageError(f"cannot reach the service at {args.url} ({type(exc).__name__})") from None
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if response.status_code != 202 or not isinstance(answer, dict) or not answer.get("job_id"):
        field = (answer.get("details") or {}).get("field") if isinstance(answer, dict) else None
        error = answer.get("error") if isinstance(answer, dict) else None
        raise UsageError(f"the service refused the job (HTTP {response.status_code}): {error or response.reason}"
                         + (f" [field: {field}]" if field else ""))
    return str(answer["job_id"])


def follow(args: argparse.Namespace, job_id: str, tracker: Tracker, on_update: Callable[[dict], None]) -> None:
    """Connect, join the job's room (again after every reconnect) and wait for the final event."""
    # No Origin header: this is not a browser, so the server's CORS_ORIGINS list must not apply to it.
    client = socketio.Client(reconnection=True, reconnection_delay=0.5, reconnection_delay_max=2,
                             websocket_extra_options={"suppress_origin": True})
    refused: list[str] = []

    def joined(ack: Any = None) -> None:
        if not (isinstance(ack, dict) and ack.get("ok")):
            refused.append(str(ack.get("error") if isinstance(ack, dict) else ack))
            tracker.done.set()

    one_at_a_time = threading.Lock()  # the client handles each message in a thread of its own

    def handler(name: str) -> Callable[[Any], None]:
        def handle(payload: Any) -> None:
            with one_at_a_time:  # an older event arriving after a newer one is dropped by its seq
                if tracker.accept(name, payload) and name == "status_update":
                    on_update(payload)
        return handle

    client.on("connect", lambda: client.emit("join_project", {"project_id": job_id}, callback=joined))
    for name in EVENTS:
        client.on(name, handler(name))
    try:
        client.connect(args.url, transports=["websocket"], auth={"token": args.api_key or ""},
                       wait_timeout=10)
    except socketio.exceptions.ConnectionError as exc:
        raise UsageError(f"cannot open the Socket.IO connection to {args.url} ({exc}); check the URL and "
                         "the API key") from None
    try:
        if not tracker.done.wait(args.timeout):
            raise UsageError(f"gave up after {args.timeout:g} s; follow on with --follow {job_id}")
        if refused:
            raise UsageError(f"cannot follow job {job_id}: {refused[0]}")
    finally:
        client.shutdown()  # also stops a reconnection in progress (disconnect() would not)


def report(event: str, payload: dict[str, Any], as_json: bool, out: TextIO, err: TextIO) -> int:
    """Print the outcome; return the exit code."""
    if as_json:
        out.write(json.dumps({"event": event, **payload}, indent=2) + "\n")
    if event == "analysis_complete":
        if not as_json:
            out.write("\n".join(summarize(payload.get("data") or {})) + "\n")
        return 0
    reason = payload.get("message") or payload.get("error") or payload.get("status")
    err.write(f"analysis {payload.get('status', 'failed')}: {reason}\n")
    return 1


def main(argv: list[str]) -> int:
    """Run `analyze`; exit 0 finished, 1 failed, 2 usage or connection error."""
    args = parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    display, tracker = Display(sys.stderr), Tracker()
    try:
        job_id = args.follow or submit(args, headers)
        print(f"job {job_id}", file=sys.stderr)
        follow(args, job_id, tracker, display.show)
    except UsageError as exc:
        display.close()
        print(f"potpie-service analyze: {scrub(str(exc), args.token)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        display.close()
        print("potpie-service analyze: interrupted (the job goes on; see --follow)", file=sys.stderr)
        return 130
    display.close()
    event, payload = tracker.final or ("analysis_error", {"message": "no final event received"})
    return report(event, payload, args.json, sys.stdout, sys.stderr)
