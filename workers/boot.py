"""The worker's pool comes from the project's settings, gevent's monkey-patching included.

Celery patches the standard library for gevent only when the pool is named on the command line
(`celery/__main__.py`, before anything else is imported). `WORKER_POOL` (default gevent) is read from the
environment instead, so a plain `celery -A workers worker`, as operators and scripts start it, is turned into the
command Celery supports: the process replaces itself (same pid) with `python -m celery ... worker --pool=gevent
--concurrency=N`. Patching later, from here, would run after Celery, kombu and ssl were imported, which gevent warns
may break them. An explicit -P/--pool (or -c) on the command line always wins.
"""

from __future__ import annotations

import os
import sys

from potpie_service.config import ConfigError, Settings

GREEN_POOLS = ("gevent",)
_MARK = "PSVC_WORKER_REEXEC"  # set on the replaced process, so it can never loop


def _names_option(argv: list[str], short: str, long: str) -> bool:
    """Whether the command line sets an option (`-P x`, `-Px`, `--pool x`, `--pool=x`)."""
    return any(arg in (short, long) or arg.startswith(long + "=") or (arg.startswith(short) and arg[1] != "-")
               for arg in argv)


def _is_worker_command() -> bool:
    """Whether this process is `celery ... worker` (not flower, inspect, multi...)."""
    try:
        import click
    except ImportError:  # not under Celery's command line
        return False
    context = click.get_current_context(silent=True)
    return context is not None and context.invoked_subcommand == "worker"


def green_command(argv: list[str], environ: dict[str, str] | os._Environ[str]) -> list[str] | None:
    """The command this worker should become so its green pool is patched in time, or None to go on as is."""
    if environ.get(_MARK) or _names_option(argv[1:], "-P", "--pool"):
        return None
    try:
        settings = Settings.from_env(environ)
    except ConfigError:  # reported, with the variable named, when workers/__init__.py loads the settings
        return None
    if settings.worker_pool not in GREEN_POOLS:
        return None
    command = [sys.executable, "-m", "celery", *argv[1:], f"--pool={settings.worker_pool}"]
    if not _names_option(argv[1:], "-c", "--concurrency"):
        command.append(f"--concurrency={settings.worker_concurrency}")
    return command


def ensure_pool() -> None:
    """Re-exec `celery -A workers worker` as the green-pool command when the settings ask for one."""
    if not _is_worker_command():
        return
    command = green_command(sys.argv, os.environ)
    if command is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[_MARK] = "1"
    os.execv(sys.executable, command)
