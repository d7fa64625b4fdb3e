"""The router: an OpenAI-compatible front that picks a worker per request by cache and load."""
