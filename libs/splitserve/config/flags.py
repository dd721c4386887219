"""CLI flags generated from the config dataclasses."""
from __future__ import annotations

from dataclasses import fields

# Flags are generated from the config dataclasses: a field `kv_cache_memory_gb` becomes
# `--kv-cache-memory-gb`, its docstring the help text, its default the flag's default.


def _field_docs(cls) -> dict[str, str]:
    """Field docstrings (the string literal right after each field) read from the class source."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value)
    return docs


def add_config_args(parser, cls, skip: tuple[str, ...] = ()) -> None:
    """Adds one `--flag` per field of the frozen dataclass `cls` (bool fields get --x/--no-x)."""
    import argparse
    import typing

    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not f.default_factory else f.default_factory()  # type: ignore[misc]
        hint = hints[f.name]
        base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kind = base[0]
        help_text = docs.get(f.name, "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif kind in (int, float, str):
            parser.add_argument(flag, type=kind, default=default, help=help_text + f" (default: {default})")
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no CLI flag for type {hint}")


def config_from_args(cls, args, **overrides):
    """Builds `cls` from an argparse namespace filled by add_config_args (validation runs)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
