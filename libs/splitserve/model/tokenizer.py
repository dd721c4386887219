"""Tokenizer and chat template, from transformers (the same code HF uses, so tokens agree).

Converting a GGUF vocabulary to a fast tokenizer takes transformers several seconds; the result is
saved once under the cache dir, keyed by the GGUF file's path, size and mtime, and loaded from there.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from splitserve.config.env import cache_dir


class Tokenizer:
    """A loaded HF tokenizer plus what the engine needs: stop ids and chat templating."""

    def __init__(self, hf_tokenizer, eos_token_ids: Sequence[int]) -> None:
        self.hf = hf_tokenizer
        self.eos_token_ids = frozenset(int(i) for i in eos_token_ids)
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered with the model's chat template."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content'")
        if not self.hf.chat_template:
            raise ValueError("this model has no chat template; pass a plain prompt instead")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # The template already holds the special tokens: do not add BOS a second time.
        return list(self.hf(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(model_path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    if model_path.is_dir():
        hf = AutoTokenizer.from_pretrained(str(model_path))
        eos = _hf_eos_ids(model_path, hf)
        return Tokenizer(hf, eos)
    stat = model_path.stat()
    key = hashlib.sha256(f"{model_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    saved = Path(cache_dir()) / "tokenizers" / key
    if (saved / "splitserve.json").is_file():
        hf = AutoTokenizer.from_pretrained(str(saved))
        eos = json.loads((saved / "splitserve.json").read_text())["eos_token_ids"]
        return Tokenizer(hf, eos)
    hf = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
    # Several processes (a prefill and a decode worker started together) may convert at once: each
    # writes its own folder, and the first rename wins. A rename onto an existing folder fails, and
    # the loser's copy is removed; a reader sees either nothing or a complete folder.
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=saved.name + ".", suffix=".tmp", dir=saved.parent))
    try:
        hf.save_pretrained(str(tmp))
        (tmp / "splitserve.json").write_text(json.dumps({"eos_token_ids": eos, "source": str(model_path)}))
        try:
            tmp.rename(saved)
        except OSError:
            if not (saved / "splitserve.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer(hf, eos)


def _hf_eos_ids(path: Path, hf) -> list[int]:
    ids: list[int] = []
    gen = path / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        ids.extend(value if isinstance(value, list) else [value] if value is not None else [])
    if hf.eos_token_id is not None and hf.eos_token_id not in ids:
        ids.append(hf.eos_token_id)
    return ids
