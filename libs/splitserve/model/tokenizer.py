"""Tokenizer and chat template from a saved fast tokenizer, with the `tokenizers` package alone.

In a process that holds torch, importing HF transformers adds 29 MiB of resident memory and its
tokenizer of the default model 49 more; this module's adds 22 (issue 19: a served worker's peak
RSS fell from 530 to 497 MiB). So serving processes read the tokenizer files themselves:
`tokenizer.json` through `tokenizers.Tokenizer.from_file`, and `tokenizer_config.json` (plus the
legacy `special_tokens_map.json`, `chat_template.jinja` and `additional_chat_templates/`) for the
special tokens, the clean-up of decoded spaces and the chat template, applied as transformers 5
(its TokenizersBackend) applies them: encode, decode and apply_chat_template give HF's ids and
text (tests/model/test_tokenizer.py compares them on hostile strings). A config naming a
model-specific class (LlamaTokenizer, ...) is read the same way; transformers may rebuild those.

A GGUF file holds its vocabulary in its own metadata. Converting it to a fast tokenizer takes
transformers several seconds, so it is done once, in a child process (splitserve.model.gguf_tokenizer),
and saved under the cache dir keyed by the file's path, size and mtime; every later load reads the
saved folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from splitserve.config.env import cache_dir
from splitserve.model.chat_template import render_chat

if TYPE_CHECKING:
    import tokenizers

# transformers' named special tokens; a config may name more (any "*_token" key holding a token)
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# what transformers' clean_up_tokenization replaces, in its order (WordPiece-era space clean-up)
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """A saved fast tokenizer plus what the engine needs: stop ids and chat templating.

    Also answers the few HF tokenizer methods the detokenizer and the gateway call (decode with
    clean_up_tokenization_spaces, convert_ids_to_tokens, get_vocab, backend_tokenizer,
    all_special_ids), so either can be given where a tokenizer is expected."""

    def __init__(self, folder: Path, eos_token_ids: Sequence[int] | None = None) -> None:
        self.folder = folder  # the saved tokenizer's files (an HF model folder, or the GGUF cache entry)
        config = _read_config(folder)
        self.special_tokens = _named_special_tokens(config)  # "bos_token" -> "<s>", ...
        self.backend_tokenizer = _backend(folder, config, self.special_tokens)
        self.chat_template = _chat_template(folder, config)
        self._extra_special = [t for t in (_token_text(v) for v in _extra_special_tokens(config)) if t]
        # transformers never cleans up a BPE tokenizer's text (it would corrupt it) unless told to
        self._clean_up_allowed = type(self.backend_tokenizer.model).__name__ != "BPE" or bool(
            config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        self._clean_up = self._clean_up_allowed and bool(config.get("clean_up_tokenization_spaces", False))
        self.eos_token_id = self._id_of("eos_token")
        self.bos_token_id = self._id_of("bos_token")
        self.pad_token_id = self._id_of("pad_token")
        if eos_token_ids is None:
            eos_token_ids = _generation_eos_ids(folder, self.eos_token_id)
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.vocab_size = self.backend_tokenizer.get_vocab_size(with_added_tokens=True)
        self._hf = None

    def __len__(self) -> int:
        return self.vocab_size

    def _id_of(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.backend_tokenizer.token_to_id(text)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named and the extra special tokens (transformers' all_special_ids)."""
        ids: list[int] = []
        for text in [*self.special_tokens.values(), *self._extra_special]:
            i = self.backend_tokenizer.token_to_id(text)
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    def encode(self, text: str) -> list[int]:
        return self._encode(text, add_special_tokens=True)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # the backend takes only text that encodes to UTF-8
            bad = next((i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF), None)
            if not isinstance(text, str) or bad is None:
                raise
            raise ValueError(f"text holds a lone UTF-16 surrogate (U+{ord(text[bad]):04X} at character {bad}), "
                             "which is not Unicode text") from None

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """HF's decode: the backend's text, then the config's space clean-up (never for BPE unless
        the config insists), unless `clean_up_tokenization_spaces` says otherwise."""
        text = self.backend_tokenizer.decode([int(i) for i in token_ids], skip_special_tokens=skip_special_tokens)
        clean = self._clean_up if clean_up_tokenization_spaces is None else (
            clean_up_tokenization_spaces and self._clean_up_allowed)
        if clean:
            for old, new in _CLEAN_UP:
                text = text.replace(old, new)
        return text

    def convert_ids_to_tokens(self, token_id: int) -> str | None:
        return self.backend_tokenizer.id_to_token(int(token_id))

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """`messages` as text, rendered with the model's chat template (special tokens as text)."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content'")
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass a plain prompt instead")
        return render_chat(self.chat_template, messages, add_generation_prompt, self.special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template."""
        text = self.render_chat(messages, add_generation_prompt)
        # The template already holds the special tokens: do not add BOS a second time.
        return self._encode(text, add_special_tokens=False)

    @property
    def hf(self):
        """transformers' own tokenizer of the same files, loaded on first use: for the HF baseline
        (`splitserve hf-serve`) and the tests that compare with HF. It costs ~78 MiB (the import
        and HF's copy of the vocabulary), so nothing on a serving path may ask for it."""
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(self.folder))
        return self._hf


def load_tokenizer(model_path: Path) -> Tokenizer:
    """The tokenizer of an HF model folder (its tokenizer.json) or of a GGUF file (converted once)."""
    if model_path.is_dir():
        if not (model_path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{model_path} has no tokenizer.json: splitserve reads fast tokenizers only "
                                    "(save the model's tokenizer with transformers' save_pretrained to write one)")
        return Tokenizer(model_path)
    saved = _converted_folder(model_path)
    return Tokenizer(saved, _saved_eos_ids(saved))


def _saved_eos_ids(saved: Path) -> list[int]:
    return json.loads((saved / "splitserve.json").read_text())["eos_token_ids"]


class LazyTokenizer:
    """A model's stop ids at once, its tokenizer on first use (from any thread, built once).

    A served worker never encodes or decodes text (the gateway does both and owns the stop
    strings); it needs the EOS ids alone. For a GGUF file those were saved with its converted
    tokenizer, so a worker never builds the tokenizer: 14.5 MiB of resident memory, plus the 3 MiB
    the `tokenizers` package maps when imported, on the default model (issue 19's bound on a
    worker's peak RSS). An HF folder's EOS ids are token names in its config, which only its
    vocabulary resolves: that tokenizer is built at once and kept."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self._lock = threading.Lock()
        self._tokenizer: Tokenizer | None = None
        if model_path.is_dir():
            self._tokenizer = load_tokenizer(model_path)
            self.eos_token_ids = self._tokenizer.eos_token_ids
        else:
            self.eos_token_ids = frozenset(int(i) for i in _saved_eos_ids(_converted_folder(model_path)))

    def get(self) -> Tokenizer:
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer


def _converted_folder(model_path: Path) -> Path:
    """The cache folder holding `model_path`'s tokenizer, converting it first if needed."""
    stat = model_path.stat()
    key = hashlib.sha256(f"{model_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    saved = Path(cache_dir()) / "tokenizers" / key
    if (saved / "splitserve.json").is_file():
        return saved
    _check_gguf_vocabulary(model_path)
    # Several processes (a prefill and a decode worker started together) may convert at once: each
    # writes its own folder, and the first rename wins. A rename onto an existing folder fails, and
    # the loser's copy is removed; a reader sees either nothing or a complete folder.
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=saved.name + ".", suffix=".tmp", dir=saved.parent))
    try:
        cmd = [sys.executable, "-m", "splitserve.model.gguf_tokenizer", str(model_path), str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0 or not (tmp / "splitserve.json").is_file():
            reason = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise ValueError(f"converting the tokenizer of {model_path} failed: {reason}")
        try:
            tmp.rename(saved)
        except OSError:
            if not (saved / "splitserve.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return saved


def _check_gguf_vocabulary(model_path: Path) -> None:
    """Refuses at once (no child process) a file that is no GGUF or holds no vocabulary."""
    from splitserve.model.gguf_file import GGUFFile

    fields = GGUFFile(model_path).fields  # GGUFFormatError (a ValueError) names the file and the fault
    missing = [k for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if k not in fields]
    if missing:
        raise ValueError(f"{model_path} holds no tokenizer: its metadata lacks {', '.join(missing)}")


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def _read_config(folder: Path) -> dict:
    """tokenizer_config.json; without its added_tokens_decoder (an older save), transformers takes
    the special tokens of special_tokens_map.json over it, and so does this."""
    config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    legacy = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy.is_file():
        config.update(_read_json(legacy))
    return config


def _token_text(value) -> str | None:
    """A token as the config writes it: a string or an AddedToken's dict ({"content": ...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _named_special_tokens(config: dict) -> dict[str, str]:
    """The standard named tokens first, then the model's own ("image_token", ...), as transformers
    orders its special_tokens_map: the variables a chat template sees."""
    named = {k: _token_text(config.get(k)) for k in NAMED_SPECIAL_TOKENS}
    for key, value in config.items():
        if key not in named and key.endswith("_token") and _token_text(value) is not None:
            named[key] = _token_text(value)
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):  # a dict of model-specific named tokens
        named.update({k: _token_text(v) for k, v in extra.items()})
    return {k: v for k, v in named.items() if v is not None}


def _extra_special_tokens(config: dict) -> list:
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    return list(extra) if isinstance(extra, list) else []


def _release_freed_heap() -> None:
    """Hands the heap pages freed while tokenizer.json was parsed back to the OS (glibc only).

    Parsing the 3.4 MB file of the default model peaks at +41 MiB and keeps +32 MiB resident, of
    which 16 MiB is free memory that fragments keep glibc from returning: malloc_trim returns it.
    A worker's RSS peaks after its KV pool is allocated, so this lowers its peak too."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _backend(folder: Path, config: dict, special: dict[str, str]) -> "tokenizers.Tokenizer":
    """tokenizer.json, set up as transformers (TokenizersBackend) sets it up: every special token
    known as a special added token, no truncation or padding, special-token text in the input
    matched as the token (unless split_special_tokens). BOS/EOS come from the file's post-processor
    alone: transformers drops the config's add_bos_token/add_eos_token when a tokenizer.json exists."""
    from tokenizers import AddedToken, processors  # here: a served worker never builds a tokenizer
    from tokenizers import Tokenizer as _Backend

    path = folder / "tokenizer.json"
    try:
        backend = _Backend.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type for a malformed file
        raise ValueError(f"{path} is not a tokenizer the tokenizers package can read: {exc}") from None
    backend.no_truncation()
    backend.no_padding()
    known = set(backend.get_added_tokens_decoder()[i].content for i in backend.get_added_tokens_decoder())
    missing = [t for t in [*special.values(), *(_token_text(v) for v in _extra_special_tokens(config))]
               if t and t not in known]
    if missing:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
    backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
    if backend.post_processor is None:  # transformers' rebuilt one: add_bos/add_eos_token are ignored (popped)
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    _release_freed_heap()
    return backend


def _chat_template(folder: Path, config: dict) -> str | None:
    """The default chat template: chat_template.jinja and additional_chat_templates/*.jinja over
    the config's "chat_template" (a string, or a list of {"name", "template"})."""
    templates: dict[str, str] = {}
    value = config.get("chat_template")
    if isinstance(value, str):
        templates["default"] = value
    elif isinstance(value, list):
        templates.update({t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t})
    files = {}
    if (folder / "chat_template.jinja").is_file():
        files["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        files.update({p.name.removesuffix(".jinja"): p.read_text(encoding="utf-8") for p in extra.glob("*.jinja")})
    if files:
        templates = files
    if not templates:
        return None
    if "default" not in templates:
        raise ValueError(f"{folder}: the tokenizer has several chat templates ({', '.join(sorted(templates))}) "
                         "and none named 'default'")
    return templates["default"]


def _generation_eos_ids(folder: Path, eos_token_id: int | None) -> list[int]:
    """generation_config.json's eos_token_id (one id or several), then the tokenizer's own EOS."""
    ids: list[int] = []
    gen = folder / "generation_config.json"
    if gen.is_file():
        value = _read_json(gen).get("eos_token_id")
        ids.extend(value if isinstance(value, list) else [value] if value is not None else [])
    if eos_token_id is not None and eos_token_id not in ids:
        ids.append(eos_token_id)
    return ids
