"""The Potpie simulator in a process of its own, for load: `python -m tests.faults.simulator_process PORT`.

Parses finish at once, and replies go out without Nagle's 40 ms stall between the header and body writes.
"""

from __future__ import annotations

import sys

from potpie_service.simulator import Simulator, SimulatorConfig


def main(port: int) -> None:
    """Serve until terminated."""
    sim = Simulator(SimulatorConfig(api_key="sk-simulator", parse_seconds=0))
    server = sim._bind("127.0.0.1", port)
    server.RequestHandlerClass.disable_nagle_algorithm = True
    server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main(int(sys.argv[1]))
