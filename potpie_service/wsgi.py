"""WSGI entry point for gunicorn: `gunicorn -w 1 --threads 100 -k gthread potpie_service.wsgi:app`."""

from .api import create_app
from .bootstrap import load_settings

app = create_app(load_settings("api"))
