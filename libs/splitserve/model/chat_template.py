"""Chat templates rendered with jinja2 the way HF transformers renders them, without importing it.

A chat template comes with the model and is untrusted code: it runs in jinja2's immutable sandbox
(no attribute writes, no mutation of lists or dicts), with HF's environment: `trim_blocks` and
`lstrip_blocks`, the loop controls (`break`, `continue`), a `{% generation %}` block that renders
its body, `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` that neither escapes HTML nor
non-ASCII, and `dict`/`namespace` that refuse underscore-prefixed names. The template sees
`messages`, `add_generation_prompt`, `tools` and `documents` (None here) and the named special
tokens (`bos_token`, `eos_token`, ...), as HF passes them, so a rendering equals HF's character for
character (tests/model/test_tokenizer.py compares them).

jinja2 is imported on the first rendering only: a worker, which never renders a chat, never loads it.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool,
                special_tokens: dict[str, str]) -> str:
    """`messages` rendered by `template`; jinja2.TemplateError when the template refuses them."""
    compiled = _compile(template)
    # the special tokens first: like HF, a template variable of the same name wins over them
    return compiled.render(**special_tokens, messages=[dict(m) for m in messages], tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt)


@lru_cache(maxsize=8)
def _compile(template: str):
    return _environment().from_string(template)


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text (for HF's assistant
        masks); rendering only needs its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class SafeNamespace(jinja2.utils.Namespace):
        """A namespace that holds no underscore-prefixed attribute (no way to CPython internals)."""

        def __init__(*args, **kwargs):  # jinja's own signature trick: `namespace(self=...)` works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a chat template may not set the underscore-prefixed attribute {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raiser(jinja2.exceptions.TemplateError)
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _PlainDict()
    env.globals["namespace"] = SafeNamespace
    return env


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raiser(error_type):
    def raise_exception(message):
        raise error_type(message)

    return raise_exception


class _PlainDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type object itself (whose
    attributes a template could walk)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)
