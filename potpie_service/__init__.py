"""potpie-service: analyse GitHub repositories through Potpie.ai, queued on Celery, pushed over Socket.IO."""

__version__ = "1.0.0"
SERVICE_NAME = "potpie-service"
