"""Every process's configuration, from one source: frozen dataclasses with a docstring per field,
built from shared parts (parts.py: server, TLS, metrics, ownership; engine.py: model, cache,
scheduler), the flags generated from them and the argv that rebuilds a config (flags.py), `splitserve
up`'s own config and flags (launch.py), and the SPLITSERVE_* environment registry (env.py).
docs/configuration.md describes them."""
