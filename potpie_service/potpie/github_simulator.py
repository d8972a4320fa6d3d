"""The subset of GitHub's REST API the service calls (a branch's head commit), served by the simulator under
`/github` so tests and `make dev` pin commits without reaching github.com.

`GET /github/repos/{owner}/{repo}/commits/{ref}` answers the head's 40-hex sha (as text for
`Accept: application/vnd.github.sha`, else `{"sha": ...}`), deterministic per repo@branch until a push moves it
(`POST /_sim/github/push {"repo", "branch"}`). The owner picks a failure: `github-missing` 404, `github-down` 503,
`github-private` 404 without a token (as GitHub hides a private repository). Tokens are never kept, only their
SHA-256 (tests prove which service received one)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from typing import Any

from .sim_http import Reply

_COMMITS = re.compile(r"/github/repos/([^/]+)/([^/]+)/commits/(.+)")
SHA_MEDIA_TYPE = "application/vnd.github.sha"


class GitHubSimulator:
    """Branch heads of simulated repositories, and what was asked of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget pushes and counts."""
        with self._lock:
            self.pushes: dict[str, int] = {}
            self.calls = 0
            self.token_sha256: list[str] = []

    def head(self, repo: str, branch: str) -> str:
        """The branch's current head commit."""
        with self._lock:
            pushes = self.pushes.get(f"{repo}@{branch}", 0)
        return hashlib.sha1(f"{repo}@{branch}#{pushes}".encode()).hexdigest()

    def push(self, repo: str, branch: str) -> str:
        """Move the branch to a new commit; return it."""
        with self._lock:
            self.pushes[f"{repo}@{branch}"] = self.pushes.get(f"{repo}@{branch}", 0) + 1
        return self.head(repo, branch)

    def stats(self) -> dict[str, Any]:
        """What the service asked of GitHub."""
        with self._lock:
            return {"calls": self.calls, "token_sha256": list(self.token_sha256)}

    def answer(self, path: str, headers: Any) -> Reply | None:
        """The answer to a GitHub route, or None when `path` is not one."""
        match = _COMMITS.fullmatch(path)
        if match is None:
            return None
        owner, name, ref = match.groups()
        token = (headers.get("Authorization") or "").partition(" ")[2].strip()
        with self._lock:
            self.calls += 1
            if token:
                self.token_sha256.append(hashlib.sha256(token.encode()).hexdigest())
        owner_kind = owner.lower()
        if owner_kind == "github-down":
            return Reply(503, {"message": "Service Unavailable"})
        if owner_kind == "github-missing" or (owner_kind == "github-private" and not token):
            return Reply(404, {"message": "Not Found", "documentation_url": "https://docs.github.com/rest"})
        sha = self.head(f"{owner}/{name}", ref)
        if SHA_MEDIA_TYPE in (headers.get("Accept") or ""):
            return Reply(200, sha.encode(), {"Content-Type": SHA_MEDIA_TYPE})
        return Reply(200, json.dumps({"sha": sha, "commit": {"message": "simulated"}}).encode())
