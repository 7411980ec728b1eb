"""Serve a baseline app with the same worker processes ``agentbus serve`` uses.

Why: agentbus's workers each listen on their own ``SO_REUSEPORT`` socket
(:mod:`agentbus.workers`), which spreads keep-alive connections over the workers; a baseline
under plain ``uvicorn --workers`` would instead often have all connections on one worker.
Both sides get the same process model, so the benchmark compares request handling alone.

Run: ``python -m bench.baselines.serve bench.baselines.redis_watch:app --workers 2 --port 8001``
"""

from __future__ import annotations

import argparse
import sys

from agentbus import workers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("app", help="module:attribute of the ASGI app")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    # The uvicorn options agentbus.cli serve passes (loop/http "auto").
    kwargs = {"app": args.app, "log_level": "warning", "lifespan": "on", "access_log": False}
    sys.exit(workers.serve(kwargs, host=args.host, port=args.port, workers=args.workers))


if __name__ == "__main__":
    main()
