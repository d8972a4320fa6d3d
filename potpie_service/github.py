"""GitHub's REST API, for one thing: the commit a branch points at, so an analysis names (and Potpie parses) the
exact commit it is about. `GITHUB_API_URL` lets GitHub Enterprise (`https://ghe.example/api/v3`) or a local
simulator stand in for api.github.com. Any failure is a `GitHubError` with a reason a person understands; the
caller goes on without a pinned commit."""

from __future__ import annotations

import re
from urllib.parse import quote

import urllib3
from urllib3.exceptions import HTTPError

SHA = re.compile(r"[0-9a-f]{40}")
_REASONS = {401: "GitHub refused the token (401)", 403: "GitHub refused access or rate-limited the token (403)",
            404: "GitHub does not show this repository or branch to the token (404)"}


class GitHubError(Exception):
    """The branch head could not be read; the message says why (never the token)."""


class GitHubClient:
    """Reads branch heads through GitHub's REST API, with one short timeout for the whole call."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = urllib3.PoolManager(num_pools=2, maxsize=8, block=False)
        self.timeout = urllib3.Timeout(total=timeout)

    def branch_head(self, repo: str, branch: str, token: str) -> str:
        """The 40-hex sha of `branch`'s head in `repo` (owner/name)."""
        url = f"{self.base_url}/repos/{quote(repo, safe='/')}/commits/{quote(branch, safe='')}"
        headers = {"Accept": "application/vnd.github.sha", "Authorization": f"Bearer {token}",
                   "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "potpie-service"}
        try:
            response = self.http.request("GET", url, headers=headers, timeout=self.timeout, retries=False,
                                         redirect=False)
        except (HTTPError, OSError) as exc:
            raise GitHubError(f"cannot reach GitHub at {self.base_url} ({type(exc).__name__})") from None
        if response.status != 200:
            raise GitHubError(_REASONS.get(response.status, f"GitHub answered {response.status}"))
        sha = response.data.decode("ascii", "replace").strip()
        if not SHA.fullmatch(sha):
            raise GitHubError("GitHub's answer was not a commit sha")
        return sha
