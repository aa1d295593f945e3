"""Serve a learner over HTTP (OpenAI-compatible) while it learns from the demonstrations it is sent."""

from selfdistill.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
