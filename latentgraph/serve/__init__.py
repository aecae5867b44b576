"""Serving a system over HTTP with an OpenAI-compatible API (``latentgraph serve``; needs the ``serve`` extra).

``app`` (the routes and :func:`~latentgraph.serve.app.create_app`), ``protocol`` (requests, checked),
``responses`` (OpenAI's response shapes), ``batcher`` (the engine thread), ``records`` (events as JSON),
``middleware`` (API key, body limit, request metrics), ``metrics`` (Prometheus' format), ``server`` (running
it with uvicorn), ``limits`` (the server's settings) and ``command`` (the CLI command; light to import).
"""
