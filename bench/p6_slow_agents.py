"""P6 slow agents: 1,000 jobs, a 1 s parse, then two agent replies that each stream for 10 s (an LLM answering).

Target: all finished <= 45 s after the last submit (the floor is the 21 s one job takes); peak worker RSS
<= 500 MB. The same measurement as P4 (bench.p4_waiting), with Potpie's time spent in replies, not in parsing:
every reply holds a connection for 10 s, so only a worker that keeps a thousand calls in flight gets near it.
"""

from __future__ import annotations

from functools import partial

from .common import cli
from .p4_waiting import configure, run

if __name__ == "__main__":
    cli("p6_slow_agents", run, partial(configure, parse_seconds=1.0, message_seconds=10.0, target=45.0, poll=1.0))
