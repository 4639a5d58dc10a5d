"""A byte-level tokenizer for the built-in tiny model: no vocabulary file, no download.

Ids: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then the 256 UTF-8 byte values (byte b -> id b + 3).
Plain ``encode`` adds no special tokens, so ``decode(encode(text)) == text`` for any text; the chat
template is what places ``<s>`` at the start and ``</s>`` after each assistant turn. ``pad_token_id`` is the
one padding rule for every tokenizer (scoring and training).
"""

from __future__ import annotations

from transformers import AddedToken, PreTrainedTokenizer

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
N_BYTES = 256

# A role header on its own line, then the content; an assistant turn ends with eos so the model learns
# to stop. Turns are joined by newlines placed *before* each header, so a conversation's rendering starts
# with the rendering of its prefix + `add_generation_prompt` (encode.py relies on that to mask prompts).
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n' }}{% endif %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _special(content: str) -> AddedToken:
    # No stripping or normalisation, so text around a special token survives a round trip unchanged.
    return AddedToken(content, lstrip=False, rstrip=False, normalized=False, special=True)


class ByteTokenizer(PreTrainedTokenizer):
    """UTF-8 bytes as tokens, plus ``<pad>``, ``<s>``, ``</s>`` (vocab_size 259)."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, chat_template: str | None = None, **kwargs) -> None:
        # Fixed ids for the specials, laid down before the base class assigns any.
        self._added_tokens_decoder = {0: _special(PAD_TOKEN), 1: _special(BOS_TOKEN), 2: _special(EOS_TOKEN)}
        self.offset = len(self._added_tokens_decoder)
        for name in ("pad_token", "bos_token", "eos_token", "unk_token"):
            kwargs.pop(name, None)  # saved configs repeat these; the ids above are the only valid ones
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(
            pad_token=self._added_tokens_decoder[0],
            bos_token=self._added_tokens_decoder[1],
            eos_token=self._added_tokens_decoder[2],
            chat_template=chat_template or DEFAULT_CHAT_TEMPLATE,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return N_BYTES + self.offset

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(b): b + self.offset for b in range(N_BYTES)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # One token per UTF-8 byte, spelled as the latin-1 character of that byte value.
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int | None:
        if len(token) == 1 and ord(token) < N_BYTES:
            return ord(token) + self.offset
        return None

    def _convert_id_to_token(self, index: int) -> str:
        # The tiny model pads its vocabulary to a multiple of 64 (bitsandbytes kernels), so an under-trained
        # model can generate an id no text maps to: it decodes to nothing, as an unknown token would.
        if not self.offset <= index < self.vocab_size:
            return ""
        return chr(index - self.offset)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for token in tokens:
            if token in self._added_tokens_encoder:
                data += token.encode("utf-8")
            elif token:
                data.append(ord(token))
        # A cut-off multi-byte character (truncation, sampling) decodes to U+FFFD instead of failing.
        return data.decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        # Specials come from the chat template, never implicitly, so encode/decode is a lossless round trip.
        return token_ids_0 + (token_ids_1 or [])

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is fixed by construction: nothing to write


def pad_token_id(tokenizer) -> int:
    """The id every batch is padded with, for scoring and for training alike: the tokenizer's pad token, or its
    eos token when it has no pad token (padded positions are masked out of attention and labels, so the choice
    changes no loss; one rule keeps the scored and the trained batches identical)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)
