"""Potpie.ai: the v2 API client the workers use, and a faithful local simulator of it."""
