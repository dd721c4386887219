"""The gateway, one module per concern: request preparation (prepare), the output stream and its stop
decision (output), a request's trace (context), the routing policy (router), the worker pool and its
health (workers), failover and resume (failover), errors and rejection reasons (errors), the request
path (service), start-up and shutdown (app), the OpenAI wire format (openai_api) and the HTTP API (http)."""
