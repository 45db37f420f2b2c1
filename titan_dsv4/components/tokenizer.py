"""Tokenizer: a ``tokenizer.json`` (Hugging Face ``tokenizers``) plus BOS/EOS ids.

The embedded debug tokenizer (byte-level BPE, 2048 tokens, built by ``scripts/build_tokenizer.py`` from the
embedded corpus) ships in ``titan_dsv4/assets``; a released checkpoint folder brings its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

EMBEDDED_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "tokenizer.json"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


class Tokenizer:
    def __init__(self, path: str | Path | None = None):
        path = Path(path) if path else EMBEDDED_TOKENIZER
        folder = path if path.is_dir() else path.parent
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer: no tokenizer.json at {file}")
        self.path = file
        self._tok = _HFTokenizer.from_file(str(file))
        self.bos_id, self.eos_id = self._special_ids(folder)

    def _special_ids(self, folder: Path) -> tuple[int, int]:
        bos, eos = self._tok.token_to_id(BOS), self._tok.token_to_id(EOS)
        config = folder / "config.json"
        if config.is_file():
            cfg = json.loads(config.read_text())
            bos = cfg.get("bos_token_id", bos)
            eos = cfg.get("eos_token_id", eos)
            eos = eos[0] if isinstance(eos, list) else eos
        if bos is None or eos is None:
            raise ValueError(f"tokenizer {self.path}: cannot find BOS/EOS ids ({BOS!r}, {EOS!r})")
        return int(bos), int(eos)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text, on all cores and without holding the GIL."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_batch_with_starts(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """``encode_batch`` with each token's first character in its text (where a loss mask begins)."""
        return [(e.ids, [start for start, _ in e.offsets])
                for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)
