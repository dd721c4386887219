"""Every role's configuration: frozen dataclasses with a docstring per field, the flags generated from them, the environment registry."""
