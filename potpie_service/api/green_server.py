"""The API's default gunicorn worker: gevent (Flask-SocketIO's gevent mode): a greenlet per HTTP connection, none for
an open WebSocket once upgraded (api/engineio_transport.py), so one process holds tens of thousands of Socket.IO
clients. Its own module, so that
gevent is imported only by a process that patched the standard library first (potpie_service/__main__.py)."""

from __future__ import annotations

from gunicorn.workers.ggevent import GeventWorker

from .server import JsonErrors


class JsonErrorGeventWorker(JsonErrors, GeventWorker):
    """gunicorn's gevent worker, answering its own rejections in JSON."""
