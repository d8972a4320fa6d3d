"""WSGI entry point for gunicorn:
`gunicorn -w 1 -k potpie_service.api.green_server.JsonErrorGeventWorker potpie_service.wsgi:app` (gevent) or
`gunicorn -w 1 --threads 100 -k potpie_service.api.server.JsonErrorWorker potpie_service.wsgi:app` (gthread),
with gunicorn's own rejections answered in JSON. `python -m potpie_service api` does this with the settings."""

from .api import create_app, preflight
from .bootstrap import load_settings

settings = load_settings("api")
preflight(settings)  # the same refusal as `python -m potpie_service api`: no keys, or an untrusted Redis
app = create_app(settings)
