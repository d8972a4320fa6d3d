"""`python -m potpie_service <command>`: api, simulator, analyze, worker-health, keygen."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time


def run_api(argv: list[str]) -> int:
    """Serve the API with gunicorn, one worker process: gevent (SOCKETIO_ASYNC_MODE, the default; the standard
    library is patched here, before gunicorn and the app are imported) or threads."""
    from .bootstrap import load_settings

    parser = argparse.ArgumentParser(prog="python -m potpie_service api")
    parser.add_argument("--threads", type=int, default=None,
                        help="SOCKETIO_ASYNC_MODE=threading: request threads (default API_THREADS); each open "
                             "WebSocket holds one")
    args = parser.parse_args(argv)
    settings = load_settings("api")
    green = settings.socketio_async_mode == "gevent"
    if green:
        import gevent
        from gevent import monkey

        # gevent records each Greenlet's spawning stack and tree, a debugging aid (~5 KiB a socket while engine.io
        # spawned three per socket; every HTTP request's greenlet still pays the stack walk): off, as in production
        gevent.config.track_greenlet_tree = False
        monkey.patch_all()
    from gunicorn.app.base import BaseApplication

    from .api import create_app, preflight

    preflight(settings)
    threads = args.threads or settings.api_threads
    connections = settings.api_connections if green else 2 * threads
    _allow_open_files(2 * connections if green else connections)  # gevent: as many WebSockets again, out of the pool
    app = create_app(settings)
    worker = {"worker_class": "potpie_service.api.green_server.JsonErrorGeventWorker"} if green else {
        "worker_class": "potpie_service.api.server.JsonErrorWorker", "threads": threads}

    class Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in {"bind": f"{settings.host}:{settings.port}", "workers": 1, **worker,
                               "worker_connections": connections, "graceful_timeout": 8, "timeout": 0,
                               # gunicorn's pure-Python parser rescans the head on each read: 100 headers of
                               # 8 KB cost 55 ms of CPU per request, 50 of them 14 ms (api/edge.py caps the total)
                               "limit_request_fields": settings.request_header_fields_max,
                               "accesslog": None, "loglevel": settings.log_level,
                               "logger_class": "potpie_service.api.server.GunicornLogger"}.items():
                self.cfg.set(key, value)

        def load(self):  # noqa: ANN202
            return app

    logging.getLogger("potpie_service").info("API listening on http://%s:%s (%s)", settings.host, settings.port,
                                             settings.socketio_async_mode)
    Server().run()
    return 0


def _allow_open_files(connections: int) -> None:
    """Raise this process's open-file limit so `connections` clients fit (each is a descriptor; 256 more for Redis
    and the rest), up to the hard limit; say so when the hard limit is lower."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        logging.getLogger("potpie_service").warning(
            "open files limited to %d (the hard limit): fewer than the %d connections API_CONNECTIONS allows fit",
            target, connections)


def worker_health(argv: list[str]) -> int:
    """Exit 0 when this host's worker consumed its heartbeat task recently (the liveness probe)."""
    from .bootstrap import load_settings
    from .store import make_store

    parser = argparse.ArgumentParser(prog="python -m potpie_service worker-health")
    parser.add_argument("--hostname", default=f"celery@{socket.gethostname()}")
    parser.add_argument("--max-age", type=float, default=None, help="seconds (default: 6 heartbeat intervals)")
    args = parser.parse_args(argv)
    settings = load_settings("worker-health")
    max_age = args.max_age or max(30.0, 6 * settings.worker_heartbeat_interval)
    try:
        seen = make_store(settings).worker_last_seen(args.hostname)
    except Exception as exc:  # the probe's answer is its exit code; any failure is "not healthy"
        print(f"unhealthy: cannot read the heartbeat from Redis ({type(exc).__name__})")
        return 1
    if seen is None or time.time() - seen > max_age:
        print(f"unhealthy: {args.hostname} has not consumed a heartbeat for over {max_age:.0f} s")
        return 1
    print(f"healthy: {args.hostname} consumed a heartbeat {time.time() - seen:.1f} s ago")
    return 0


def keygen(argv: list[str]) -> int:
    """Print a new client API key and its API_KEYS entry, or a TOKEN_ENCRYPTION_KEY."""
    from .auth import new_key
    from .tokens import new_key as new_token_key

    parser = argparse.ArgumentParser(prog="python -m potpie_service keygen")
    parser.add_argument("--name", default="client", help="the key's owner name (jobs belong to it)")
    parser.add_argument("--token-key", action="store_true", help="print a TOKEN_ENCRYPTION_KEY instead")
    args = parser.parse_args(argv)
    if args.token_key:
        print(new_token_key())
        return 0
    try:
        key, entry = new_key(args.name)
    except ValueError as exc:
        parser.error(f"--name: {exc}")
    print(f"key (give to the client, shown once): {key}")
    print(f"API_KEYS entry (store on the server): {entry}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a sub-command."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"api": run_api, "worker-health": worker_health, "keygen": keygen}
    if argv and argv[0] == "simulator":
        from .potpie.simulator import main as simulator_main
        return simulator_main(argv[1:])
    if argv and argv[0] == "analyze":
        from .cli import main as cli_main
        return cli_main(argv[1:])
    if not argv or argv[0] not in commands:
        print("usage: python -m potpie_service {api|worker|simulator|analyze|worker-health|keygen} ...\n"
              "  (the worker and Flower: celery -A workers worker / celery -A workers flower)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
