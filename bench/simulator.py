"""The Potpie simulator for benchmarks: `potpie_service simulator` with TCP_NODELAY on its sockets.

http.server writes a reply's headers and body in separate sends; without TCP_NODELAY the body waits for the
client's delayed ACK (~40 ms per call on Linux), which would swamp every figure. Real Potpie (uvicorn) sets it.
"""

from __future__ import annotations

import sys

from potpie_service import simulator

simulator._Handler.disable_nagle_algorithm = True

if __name__ == "__main__":
    sys.exit(simulator.main(sys.argv[1:]))
