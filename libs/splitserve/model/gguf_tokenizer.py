"""Converts a GGUF file's vocabulary into a saved fast tokenizer, in a child process of its own:

    python -m splitserve.model.gguf_tokenizer MODEL.gguf OUT_FOLDER

The conversion needs HF transformers, whose import alone holds ~29 MiB for the rest of a process's
life (a process with torch); a serving process runs this once (the result is cached, see splitserve.model.tokenizer) and
never imports transformers itself. OUT_FOLDER receives tokenizer.json, tokenizer_config.json, the
chat template, and splitserve.json ({"eos_token_ids": [...], "source": MODEL.gguf}).
On failure it exits with status 1 and one line on stderr saying what is wrong with which file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def convert(gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    eos = [hf.eos_token_id] if hf.eos_token_id is not None else []
    hf.save_pretrained(str(out))
    (out / "splitserve.json").write_text(json.dumps({"eos_token_ids": eos, "source": str(gguf_path)}))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m splitserve.model.gguf_tokenizer MODEL.gguf OUT_FOLDER", file=sys.stderr)
        return 2
    gguf_path, out = Path(argv[0]), Path(argv[1])
    try:
        convert(gguf_path, out)
    except Exception as exc:  # noqa: BLE001 - the parent shows this line as the reason
        print(f"cannot read a tokenizer from {gguf_path}: {type(exc).__name__}: {exc}".replace("\n", " "),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
