"""Tokenizer from a HF tokenizer.json or from GGUF metadata, through `tokenizers`, plus chat templates."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from rcllm_jax.model.config import UnsupportedModelError

_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_SPLIT = (r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"""
                r"""|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# llama.cpp's `tokenizer.ggml.pre` -> the regex splits it applies, in order, before byte-level BPE.
GGUF_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _pre_tokenizer(splits: Sequence[str]):
    parts = [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
    return pre_tokenizers.Sequence(parts + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


class Tokenizer:
    """Text <-> token ids, special tokens, and the model's chat template."""

    def __init__(self, tok: HFTokenizer, *, bos_token: str | None, eos_token: str | None,
                 chat_template: str | None, add_bos: bool = False):
        self.tok = tok
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        stops = {self.eos_id}
        for name in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>"):
            stops.add(tok.token_to_id(name))
        self.stop_ids = frozenset(i for i in stops if i is not None)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token strings in it are matched whole."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; pass the raw prompt instead")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def content_hash(self) -> str:
        """sha256 of the tokenizer's full definition: caches built with another tokenizer are refused."""
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    # --- constructors -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        model = _gguf_field(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedModelError(
                f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2'); "
                "load the model from a HF directory with tokenizer.json instead")
        pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_SPLITS:
            raise UnsupportedModelError(
                f"GGUF pre-tokenizer {pre!r} is not supported; known: {', '.join(sorted(GGUF_PRE_SPLITS))}")
        tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges", [])]
        types = list(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=False)
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = _pre_tokenizer(GGUF_PRE_SPLITS[pre])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == _CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

        def tok_name(key):
            i = _gguf_field(reader, key)
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        return cls(tok, bos_token=tok_name("tokenizer.ggml.bos_token_id"),
                   eos_token=tok_name("tokenizer.ggml.eos_token_id"),
                   chat_template=_gguf_field(reader, "tokenizer.chat_template"),
                   add_bos=bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.exists():
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        tok = HFTokenizer.from_file(str(tj))
        cfg: dict[str, Any] = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())

        def name(v):
            return v.get("content") if isinstance(v, dict) else v

        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        # add_bos: the tokenizer.json post-processor already inserts it when the model wants it.
        return cls(tok, bos_token=name(cfg.get("bos_token")), eos_token=name(cfg.get("eos_token")),
                   chat_template=template, add_bos=False)
