"""The gateway: request preparation, output stream, router, worker pool and health, failover, the OpenAI wire format and the HTTP API."""
