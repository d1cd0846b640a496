"""The gateway: how programs reach goclaw over HTTP and WebSocket.

It enqueues work and streams events; it never runs a model and never imports
LiteLLM. Every route but ``/healthz`` needs the bearer token in
``$GOCLAW_HOME/auth.token``.
"""
