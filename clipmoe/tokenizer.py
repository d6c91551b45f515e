"""open_clip's CLIP BPE tokenizer, made safe for text from the outside world.

Same tokens as open_clip for ordinary text. Differences, all on input open_clip mishandles:
- text is literal: `<end_of_text>` / `<start_of_text>` typed in a caption are ordinary characters, so
  they cannot end the sequence early (pooling happens at the first end token);
- input is cut before BPE (to what `context_length` tokens can use) and words over 128 characters are
  encoded in 128-character pieces, so a 1 MB string costs milliseconds instead of BPE's quadratic
  time on one long word;
- lone surrogates are dropped instead of raising; NUL and zero-width characters pass through.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import regex
import torch
from open_clip.tokenizer import SimpleTokenizer

# open_clip's pre-tokeniser pattern without the special-token alternatives in front.
_WORDS = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
_CHARS_PER_TOKEN = 64  # raw characters kept per context position; ordinary text needs far fewer
_CHUNK = 128  # a longer pre-token is BPE-encoded in pieces of this many characters (BPE is quadratic)


class Tokenizer:
    """Callable like open_clip's tokenizer: `tokenizer(texts, context_length=None) -> LongTensor (B, L)`."""

    def __init__(self, context_length: int = 77):
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.sot_token_id = self._bpe.sot_token_id
        self.eot_token_id = self._bpe.eot_token_id
        self.vocab_size = self._bpe.vocab_size

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """BPE ids of `text` (no start/end tokens), at most `max_tokens` of them."""
        max_tokens = max_tokens or self.context_length
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        text = text[: max_tokens * _CHARS_PER_TOKEN]
        text = text.encode("utf-8", "ignore").decode("utf-8")  # drops lone surrogates
        text = self._bpe.clean_fn(text)
        ids: list[int] = []
        byte_encoder, encoder = self._bpe.byte_encoder, self._bpe.encoder
        for m in _WORDS.finditer(text):
            word = m.group()
            for start in range(0, len(word), _CHUNK):
                piece = "".join(byte_encoder[b] for b in word[start:start + _CHUNK].encode("utf-8"))
                ids.extend(encoder[t] for t in self._bpe.bpe(piece).split(" "))
                if len(ids) >= max_tokens:
                    return ids[:max_tokens]
        return ids

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        L = context_length or self.context_length
        out = torch.zeros(len(texts), L, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text, L - 1)[: L - 2] + [self.eot_token_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids) -> str:
        return self._bpe.decode([int(i) for i in ids if int(i) not in (0, self.sot_token_id, self.eot_token_id)])

    def words(self, ids) -> list[Optional[str]]:
        """For each token id, the whole word it belongs to ("cy" and "an" of "cyan" both give "cyan"); None for
        the start, end and padding tokens. BPE marks a word's last piece with "</w>"."""
        special = (0, self.sot_token_id, self.eot_token_id)
        out: list[Optional[str]] = []
        pieces: list[int] = []

        def end_word():  # every piece of the word gets the whole word
            out.extend([self._bpe.decode(pieces).strip()] * len(pieces))
            pieces.clear()

        for i in (int(i) for i in ids):
            if i in special:
                end_word()  # a word cut off by truncation
                out.append(None)
                continue
            pieces.append(i)
            if self._bpe.decoder[i].endswith("</w>"):
                end_word()
        end_word()
        return out
