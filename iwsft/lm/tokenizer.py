"""Byte-level tokenizer: UTF-8 bytes 0-255 plus BOS, EOS and PAD."""

from __future__ import annotations

import numpy as np

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str) -> list[int]:
  """Text -> byte ids (no special tokens)."""
  return list(text.encode("utf-8"))


def decode(ids) -> str:
  """Ids -> text, stopping at the first EOS and skipping BOS/PAD; invalid UTF-8 is replaced."""
  out = bytearray()
  for i in np.asarray(ids).tolist():
    if i == EOS:
      break
    if i < 256:
      out.append(i)
  return out.decode("utf-8", errors="replace")


class ByteTokenizer:
  """The byte-level tokenizer behind the interface pretrained tokenizers share (HFTokenizer)."""

  bos, eos, pad, vocab_size = BOS, EOS, PAD, VOCAB_SIZE

  def encode(self, text: str) -> list[int]:
    return encode(text)

  def decode(self, ids) -> str:
    return decode(ids)

  def prompt(self, text: str) -> list[int]:
    """A prompt's ids: BOS, then its bytes."""
    return [BOS, *encode(text)]


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer with its special ids and chat template.

  prompt(text) renders the chat template with one user message and the generation prompt (plain
  text when the model has no template); a completion is encoded as its text followed by EOS.
  """

  def __init__(self, tok, bos: int | None, eos: int, pad: int | None, chat_template: str | None):
    self.tok, self.bos, self.eos = tok, bos, eos
    self.pad = eos if pad is None else pad
    self.chat_template = chat_template
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    """Ids -> text, stopping at the first EOS, special tokens skipped."""
    ids = [int(i) for i in np.asarray(ids).tolist()]
    if self.eos in ids:
      ids = ids[: ids.index(self.eos)]
    return self.tok.decode(ids, skip_special_tokens=True)

  def token(self, i: int | None) -> str | None:
    return None if i is None else self.tok.id_to_token(i)

  def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise ValueError(message)

    env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(self.chat_template).render(
      messages=messages,
      add_generation_prompt=add_generation_prompt,
      bos_token=self.token(self.bos) or "",
      eos_token=self.token(self.eos),
    )

  def prompt(self, text: str) -> list[int]:
    if not self.chat_template:
      return ([] if self.bos is None else [self.bos]) + self.encode(text)
    return self.encode(self.render_chat([{"role": "user", "content": text}]))

  def special_ids(self) -> dict:
    return {"bos_token_id": self.bos, "eos_token_id": self.eos, "pad_token_id": self.pad}

  def save(self, path: str) -> None:
    """tokenizer.json and tokenizer_config.json, as a Hugging Face model directory holds them."""
    import json
    import os

    self.tok.save(os.path.join(path, "tokenizer.json"))
    config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": self.token(self.bos),
      "eos_token": self.token(self.eos),
      "pad_token": self.token(self.pad),
      "chat_template": self.chat_template,
      "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)


def from_hf_dir(path: str) -> HFTokenizer:
  """The tokenizer of a Hugging Face model directory (tokenizer.json + tokenizer_config.json)."""
  import json
  import os

  from tokenizers import Tokenizer

  from iwsft.errors import UserError

  file = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(file):
    raise UserError(f"{path} has no tokenizer.json")
  try:
    tok = Tokenizer.from_file(file)
    config_file = os.path.join(path, "tokenizer_config.json")
    config = json.load(open(config_file)) if os.path.exists(config_file) else {}
  except Exception as e:  # noqa: BLE001  a corrupt file
    raise UserError(f"cannot read the tokenizer in {path}: {type(e).__name__}: {e}") from None
  token_id = lambda key: None if config.get(key) is None else tok.token_to_id(_content(config[key]))
  eos = token_id("eos_token")
  if eos is None:
    raise UserError(f"{path}: tokenizer_config.json names no eos_token")
  return HFTokenizer(
    tok, token_id("bos_token"), eos, token_id("pad_token"), config.get("chat_template")
  )


def _content(token) -> str:
  return token["content"] if isinstance(token, dict) else token


def from_gguf(reader) -> HFTokenizer:
  """A byte-level BPE tokenizer built from a GGUF file's embedded vocabulary and merges (GPT-2
  style, digits split one by one before the byte-level split, as SmolLM2's)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

  from iwsft.errors import UserError

  fields = reader.fields
  if fields["tokenizer.ggml.model"].contents() != "gpt2":
    raise UserError("only byte-level BPE (gpt2) GGUF tokenizers are supported")
  tokens = fields["tokenizer.ggml.tokens"].contents()
  types = fields["tokenizer.ggml.token_type"].contents()
  merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
  tok = Tokenizer(
    models.BPE(
      vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False
    )
  )
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.add_special_tokens(
    [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == 3]
  )
  get = lambda key: int(fields[key].contents()) if key in fields else None
  template = (
    fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None
  )
  return HFTokenizer(
    tok,
    get("tokenizer.ggml.bos_token_id"),
    get("tokenizer.ggml.eos_token_id"),
    get("tokenizer.ggml.padding_token_id"),
    template,
  )
