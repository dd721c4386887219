"""CLI flags generated from the config dataclasses, and the way back: a config to the argv that
rebuilds it.

A field becomes a flag: `kv_cache_memory_gb` -> `--kv-cache-memory-gb`, its docstring the help, its
default the flag's default. A field whose type is itself a config dataclass (a *part*: ServerConfig,
TLSConfig, EngineConfig ...) is flattened: its fields become flags of the outer config, named with
the part's `flag_prefix` (field metadata; none by default), recursively. The flag without its
dashes is the field's *flat name* (`internal_tls_ca_file`); flat names are unique per config, and
`@composed` configs can be built and read by them (`WorkerConfig(port=0)`, `config.redis_url`).

Invariant (tested): for every config `c`, `config_from_args(type(c), parse(config_to_argv(c))) == c`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, NamedTuple

SCALARS = (bool, int, float, str)


class FlatField(NamedTuple):
    name: str  # flat name: the flag without "--", "-" as "_"
    path: tuple[str, ...]  # attribute path from the root config, e.g. ("engine", "cache", "block_size")
    kind: type  # bool, int, float or str
    optional: bool  # the type is `kind | None` (an empty flag value means None)
    default: Any  # the root config's default for this field (a part's default comes from the root)
    doc: str  # the field's docstring
    choices: tuple  # allowed values (field metadata "choices"); empty: any


def _field_docs(cls) -> dict[str, str]:
    """Field docstrings (the string literal right after each field) read from the source of the
    class and of the dataclasses it inherits fields from."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if is_dataclass(k)]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _own_default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name} has no default: every config field needs one")


def _is_part(hint) -> bool:
    return isinstance(hint, type) and is_dataclass(hint)


@functools.cache
def flat_fields(cls) -> tuple[FlatField, ...]:
    """Every scalar field of `cls`, its parts flattened, in declaration order."""
    out = tuple(_walk(cls, (), "", None))
    seen: dict[str, tuple[str, ...]] = {}
    for ff in out:
        if ff.name in seen:
            raise TypeError(f"{cls.__name__}: flat name {ff.name!r} of {'.'.join(ff.path)} is also "
                            f"{'.'.join(seen[ff.name])} (give one part a flag_prefix)")
        seen[ff.name] = ff.path
    return out


def _walk(cls, path: tuple[str, ...], prefix: str, defaults: Any):
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if not f.init:
            continue
        hint = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _own_default(f)
        if _is_part(hint):
            yield from _walk(hint, path + (f.name,), prefix + f.metadata.get("flag_prefix", ""), default)
            continue
        args = typing.get_args(hint)
        base = [a for a in args if a is not type(None)] or [hint]
        if len(base) != 1 or base[0] not in SCALARS:
            raise TypeError(f"{cls.__name__}.{f.name}: no CLI flag for type {hint}")
        yield FlatField(prefix + f.name, path + (f.name,), base[0], type(None) in args, default,
                        docs.get(f.name, ""), tuple(f.metadata.get("choices", ())))


def flag_name(ff: FlatField, prefix: str = "") -> str:
    return "--" + (prefix + ff.name).replace("_", "-")


def show_default(value: Any) -> str:
    return '""' if value == "" else str(value)


def _converter(kind: type, optional: bool):
    if not optional:
        return kind

    def convert(text: str):
        return kind(text) if text.strip() else None  # "" is None: compose passes --model "" for "unset"

    convert.__name__ = kind.__name__  # argparse names the type in its error message
    return convert


def add_flag(parser, ff: FlatField, names: list[str], dest: str, default: Any, help_default: Any) -> None:
    """One flag for `ff`, under the option strings `names`, stored at `dest`."""
    # argparse %-formats help texts: a literal % in a docstring would break --help
    text = f"{ff.doc} (default: {show_default(help_default)})".replace("%", "%%")
    if ff.kind is bool:
        parser.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=text)
    else:
        parser.add_argument(*names, dest=dest, type=_converter(ff.kind, ff.optional), default=default, help=text,
                            choices=ff.choices or None, metavar=ff.name.upper())


def add_config_args(parser, cls, skip: tuple[str, ...] = (), prefix: str = "", given_only: bool = False) -> None:
    """Adds one `--flag` per flat field of `cls` (bool fields get --x/--no-x). With `prefix`, the
    flags are --PREFIX-FIELD and their dests PREFIX_FIELD; with `given_only`, a flag left out
    parses as None (so a caller can tell "not given" from the default, which the help still shows)."""
    for ff in flat_fields(cls):
        if ff.name in skip or ff.path[0] in skip:
            continue
        dest = (prefix + ff.name).replace("-", "_")
        add_flag(parser, ff, [flag_name(ff, prefix)], dest, None if given_only else ff.default, ff.default)


def get_path(config, path: tuple[str, ...]) -> Any:
    for name in path:
        config = getattr(config, name)
    return config


def flat_values(config) -> dict[str, Any]:
    """Flat name -> value of every field of `config`."""
    return {ff.name: get_path(config, ff.path) for ff in flat_fields(type(config))}


def _with_paths(part, changes: list[tuple[tuple[str, ...], Any]]):
    """`part` with the values at the given paths (relative to it) replaced; validation runs."""
    direct: dict[str, Any] = {}
    nested: dict[str, list] = {}
    for path, value in changes:
        if len(path) == 1:
            direct[path[0]] = value
        else:
            nested.setdefault(path[0], []).append((path[1:], value))
    for name, sub in nested.items():
        direct[name] = _with_paths(getattr(part, name), sub)
    return dataclasses.replace(part, **direct)


def route_flat(cls, kwargs: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` of `cls(...)` with the flat names in `flat` moved into the parts they belong to."""
    paths = {ff.name: ff.path for ff in flat_fields(cls)}
    by_part: dict[str, list] = {}
    for name, value in flat.items():
        if name not in paths:
            raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}")
        path = paths[name]
        by_part.setdefault(path[0], []).append((path[1:], value))
    own = {f.name: f for f in fields(cls)}
    out = dict(kwargs)
    for part, changes in by_part.items():
        base = out[part] if part in out else _own_default(own[part])
        out[part] = _with_paths(base, changes)
    return out


def composed(cls):
    """Class decorator for a frozen config dataclass made of parts: `cls(...)` also takes the flat
    names of its parts' fields (`WorkerConfig(port=0, dtype="float32")` sets server.port and
    engine.model.dtype), and reading a flat name reads through the parts (`config.redis_url` is
    `config.ownership.redis_url`), so code that reads configs needs no part names."""
    dataclass_init = cls.__init__
    own = {f.name for f in fields(cls) if f.init}

    def __init__(self, *args, **kwargs):
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k not in own}
        if flat:
            kwargs = route_flat(cls, kwargs, flat)
        dataclass_init(self, *args, **kwargs)

    def __getattr__(self, name: str):  # only reached when normal lookup fails
        path = _flat_paths(type(self)).get(name)
        if path is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return get_path(self, path)

    __init__.__doc__ = dataclass_init.__doc__
    cls.__init__ = __init__
    cls.__getattr__ = __getattr__
    return cls


@functools.cache
def _flat_paths(cls) -> dict[str, tuple[str, ...]]:
    return {ff.name: ff.path for ff in flat_fields(cls) if len(ff.path) > 1}


def config_from_args(cls, args, prefix: str = "", **overrides):
    """Builds `cls` from an argparse namespace filled by add_config_args (validation runs). Values
    that are None in a `given_only` namespace take the defaults."""
    values = {}
    for ff in flat_fields(cls):
        dest = prefix + ff.name
        if hasattr(args, dest):
            value = getattr(args, dest)
            if value is not None or ff.optional:
                values[ff.name] = value
    values.update(overrides)
    return from_flat(cls, values)


def from_flat(cls, values: dict[str, Any]):
    """`cls` from flat names (missing ones take their defaults); TypeError names an unknown one."""
    own = {f.name for f in fields(cls) if f.init}
    kwargs = {k: v for k, v in values.items() if k in own}
    flat = {k: v for k, v in values.items() if k not in own}
    return cls(**route_flat(cls, kwargs, flat)) if flat else cls(**kwargs)


def format_value(value: Any) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def config_to_argv(config, prefix: str = "") -> list[str]:
    """The flags that rebuild `config` from its class's defaults: one per field that differs from
    its default (the inverse of add_config_args + config_from_args)."""
    argv: list[str] = []
    for ff in flat_fields(type(config)):
        value = get_path(config, ff.path)
        if value == ff.default and type(value) is type(ff.default):
            continue
        flag = flag_name(ff, prefix)
        if ff.kind is bool:
            if value is None:
                raise ValueError(f"{ff.name}: None cannot be written as a flag (its default is {ff.default})")
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, format_value(value)]
    return argv


def parse_role_args(cls, argv: list[str] | None, prog: str, description: str):
    """What a role's `main` starts with: its flags (generated from `cls`) and --log-level parsed,
    logging set up, the config built. A bad value exits 2 with the parser's message naming it."""
    from splitserve import logs

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_config_args(parser, cls)
    logs.add_log_args(parser)
    args = parser.parse_args(argv)
    logs.configure(args.log_level)
    try:
        return config_from_args(cls, args)
    except ValueError as exc:
        parser.error(str(exc))
