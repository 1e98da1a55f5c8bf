"""The REST API (FastAPI): schemas, routes, and errors rendered as problem+json."""
