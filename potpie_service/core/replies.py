"""What of an agent's reply is the agent's own words: Potpie's status chunks taken out.

Potpie's server puts texts of its own into a reply's stream (shared/potpie/API-FACTS.md §8.2-8.3): the sandbox's
setup banner as the first object (glued to the answer's first words when `stream=false` joins the chunks), and a
sub-agent's failure as `[[SUBAGENT_ERROR]]` with a fixed sentence. Neither is an answer: they never reach `answer`,
the structured analysis, events or webhooks. A reply with nothing left is no answer at all.
"""

from __future__ import annotations

import re

SETUP_BANNER = "\u23f3 Setting up repository workspace, please wait..."
# the banner as the server writes it, or with a changed wording: an hourglass, then up to "please wait..."
_BANNER = re.compile(r"\s*\u23f3[^\n]{0,200}?please wait\.{3}\s*")
_SUBAGENT_ERROR = re.compile(r"\[\[SUBAGENT_ERROR\]\]\n?(?:The operation could not be completed\.)?\n?")


def is_status_chunk(text: str) -> bool:
    """Whether one streamed object's text is one of Potpie's own status texts (nothing of the agent's)."""
    return bool(text) and not agent_words(text)


def agent_words(text: str) -> str:
    """A reply's text without Potpie's status texts: a leading setup banner, any sub-agent failure marker."""
    banner = _BANNER.match(text)
    if banner:
        text = text[banner.end():]
    return _SUBAGENT_ERROR.sub("", text)


def join_chunks(chunks: list[str]) -> str:
    """The agent's words of a streamed reply: its chunks' texts joined, status chunks left out."""
    return agent_words("".join(chunk for chunk in chunks if not is_status_chunk(chunk)))
