"""Entry-point helpers: read .env and the environment once, stop with one clear line on bad configuration."""

from __future__ import annotations

import logging
import os
import sys

from dotenv import load_dotenv

from .config import ConfigError, Settings
from .logs import setup_logging


def load_settings(component: str) -> Settings:
    """Settings for an entry point; exits with status 2 and one line naming each bad variable."""
    if os.path.exists(".env"):
        load_dotenv(".env", override=False)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"potpie-service {component}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings.log_level, settings.log_format)
    logging.getLogger("potpie_service").info("%s starting with %s", component, settings.redacted())
    return settings
