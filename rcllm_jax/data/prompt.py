"""Block-structured ranking prompts.

A prompt is a sequence of typed blocks, each tokenized on its own; the model always sees the
concatenation of the blocks' tokens, in every mode. The text of each kind of block comes from a
`PromptTemplate` (`data/prompt_template.py`; `--prompt=FILE.toml`); the default template's:

  instruction  chat header + system text + "Movies I watched, oldest first:\n"   (one per template)
  history      one line per history item                                      (one per user)
  glue         "Candidates:\n(A)"  /  "\n(B)"  ...                               (per request)
  item         " Toy Story (1995; Animation, Children's, Comedy)"              (one per catalog item)
  glue         "\n<question><chat footer>("                                    (per request)

With the score-slot head (`PromptBuilder(head="slot")`) candidates carry no label: a list
"Candidates:\n- <item>\n- <item>\n...", each item block followed by a one-token `slot` block
("\n", ending its line; the "-" before the next item is glue) that every mode recomputes; the
candidate's score is read from the slot's final hidden state by a trained head (`engine/ranking_head.py`), all candidates in the same prefill. The slot attends to
the history, the earlier candidates and its own item, so no label has to be bound to an item.

Item text is request-independent (no label, no numbering), so one item block serves every prompt.
Block boundaries sit where the tokenizer's pre-tokenizer splits anyway (before a space-prefixed
word, after ")" or "\n"), so the concatenation equals tokenizing the whole text (tested on the
real catalog). Labels: letters A..Z, then a..z, for up to 52 candidates (one token each: the
first-token logits rank all candidates); numbers 1..K beyond that (several tokens: scored by
teacher forcing, one extra forward pass).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Mapping, Sequence

import numpy as np

from rcllm_jax.data.movielens import Item
from rcllm_jax.data.prompt_template import DEFAULT_TEMPLATE, PromptTemplate, TemplateError
from rcllm_jax.model.tokenizer import Tokenizer

BLOCK_KINDS = ("instruction", "history", "item", "glue", "slot")
HEADS = ("label", "slot")
_MARK = "\x00USER_CONTENT\x00"


@dataclasses.dataclass(frozen=True)
class Block:
    kind: str
    text: str
    tokens: tuple[int, ...]
    item_id: int | None = None

    def __post_init__(self):
        if self.kind not in BLOCK_KINDS:
            raise ValueError(f"unknown block kind {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class Prompt:
    blocks: tuple[Block, ...]
    candidates: tuple[int, ...]  # item ids, in prompt order
    labels: tuple[str, ...]  # label shown before each candidate
    label_tokens: tuple[tuple[int, ...], ...]  # the answer's tokens for each label
    close_token: int  # token that ends a label, ")": needed to score multi-token labels
    head: str = "label"  # "label": scored by the answer's label logits; "slot": by score slots

    @property
    def slot_positions(self) -> np.ndarray:
        """[K] token position of each candidate's score slot (slot prompts), prompt order."""
        ends = np.cumsum([len(b.tokens) for b in self.blocks])
        return np.asarray([e - 1 for b, e in zip(self.blocks, ends) if b.kind == "slot"], np.int32)

    @property
    def tokens(self) -> np.ndarray:
        return np.fromiter((t for b in self.blocks for t in b.tokens), dtype=np.int32)

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.blocks)

    def __len__(self) -> int:
        return sum(len(b.tokens) for b in self.blocks)

    @property
    def single_token_labels(self) -> bool:
        firsts = [lt[0] for lt in self.label_tokens]
        return all(len(lt) == 1 for lt in self.label_tokens) and len(set(firsts)) == len(firsts)

    def spans(self) -> list[tuple[int, int]]:
        """[start, end) token offsets of each block."""
        ends = np.cumsum([len(b.tokens) for b in self.blocks])
        return [(int(e - len(b.tokens)), int(e)) for b, e in zip(self.blocks, ends)]


def labels_for(k: int) -> tuple[str, ...]:
    """A..Z then a..z up to 52 candidates, else 1..k."""
    letters = string.ascii_uppercase + string.ascii_lowercase
    return tuple(letters[:k]) if k <= len(letters) else tuple(str(i) for i in range(1, k + 1))


# The prompt every launcher builds unless told otherwise (serve.py, bench.py, recommend.py and
# build_cache.py: a snapshot built with the defaults is the one the server and the benchmark restore).
SERVED_HEAD = "slot"  # score slots read by the shipped ranking head
SERVED_HISTORY_LEN = 20  # history items in a prompt (the most recent)


class PromptBuilder:
    """Builds the typed blocks of a ranking prompt for a tokenizer and an item catalog."""

    def __init__(self, tokenizer: Tokenizer, items: Mapping[int, Item], *, history_len: int = 20,
                 max_prompt_tokens: int | None = None, template: PromptTemplate = DEFAULT_TEMPLATE,
                 head: str = "label", max_item_tokens: int | None = None):
        if history_len < 0:
            raise ValueError("history_len must be >= 0")
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.head = head
        self.tok, self.items, self.history_len = tokenizer, items, history_len
        self.max_prompt_tokens, self.template = max_prompt_tokens, template
        if tokenizer.chat_template:
            chat = tokenizer.apply_chat_template(
                [{"role": "system", "content": template.system}, {"role": "user", "content": _MARK}],
                add_generation_prompt=True)
            self.chat_head, self.chat_tail = chat.split(_MARK)
        else:
            self.chat_head, self.chat_tail = template.system + "\n\n", "\n"
        self._item_tokens: dict[int, tuple[int, ...]] = {}
        self.max_item_tokens, self._capped = max_item_tokens, {}
        self.instruction = self._block("instruction", self.chat_head + template.instruction)
        self.close_token = self._single(template.label_close, "label_close")
        self._single(template.slot, "slot")

    def _single(self, text: str, field: str) -> int:
        ids = self.tok.encode(text)
        if len(ids) != 1:
            raise TemplateError(f"prompt field {field!r} = {text!r} must be one token for this tokenizer "
                                f"(it is {len(ids)})")
        return ids[0]

    def _block(self, kind: str, text: str, item_id: int | None = None) -> Block:
        return Block(kind, text, tuple(self.tok.encode(text)), item_id)

    def _item(self, item_id: int) -> Item:
        try:
            return self.items[item_id]
        except KeyError:
            raise KeyError(f"unknown item id {item_id}") from None

    def item_text(self, item: Item) -> str:
        """Request-independent text of one item: its catalog's templated text (cut to
        `max_item_tokens`), else title (year; genres)."""
        if item.text is not None:
            if self.max_item_tokens is None:
                return item.text
            if item.item_id not in self._capped:
                ids = self.tok.encode(item.text)
                # (a cut inside a character's bytes leaves a replacement character: dropped)
                cut = self.tok.decode(ids[:self.max_item_tokens]).rstrip("\ufffd").rstrip()
                self._capped[item.item_id] = item.text if len(ids) <= self.max_item_tokens else cut
            return self._capped[item.item_id]
        return movielens_text(item)

    def item_block(self, item_id: int) -> Block:
        text = self.template.fill("item", item=self.item_text(self._item(item_id)))
        if item_id not in self._item_tokens:
            self._item_tokens[item_id] = tuple(self.tok.encode(text))
        return Block("item", text, self._item_tokens[item_id], item_id)

    def catalog_tokens(self) -> int:
        """Tokens of every catalog item's block: what an item cache of the whole catalog holds."""
        return sum(len(self.item_block(i).tokens) for i in self.items)

    def history_block(self, history: Sequence[int]) -> Block:
        recent = list(history)[-self.history_len:] if self.history_len else []
        line = self.template.history_item
        text = "".join(line.format(item=self.item_text(self._item(i))) for i in recent) or self.template.empty_history
        return self._block("history", text)

    def first_lead(self) -> str:
        """The glue text that stands right before a prompt's first candidate in this head's format
        (the default: "Candidates:\n(A)" with labels, "Candidates:\n-" with score slots)."""
        t = self.template
        return t.first_slot if self.head == "slot" else t.fill("first_label", label=labels_for(1)[0])

    def build(self, history: Sequence[int], candidates: Sequence[int], check_length: bool = True) -> Prompt:
        """The prompt that asks which of `candidates` follows `history` (item ids)."""
        candidates = tuple(int(c) for c in candidates)
        check_candidates(candidates)
        if self.head == "slot":
            return self._build_slots(history, candidates, check_length)
        labels = labels_for(len(candidates))
        blocks = [self.instruction, self.history_block(history)]
        for j, (label, item) in enumerate(zip(labels, candidates)):
            lead = "first_label" if j == 0 else "next_label"
            blocks.append(self._block("glue", self.template.fill(lead, label=label)))
            blocks.append(self.item_block(item))
        blocks.append(self._block("glue", self.template.fill("label_question", chat_tail=self.chat_tail)))
        prompt = Prompt(tuple(blocks), candidates, labels,
                        tuple(tuple(self.tok.encode(lb)) for lb in labels), self.close_token)
        return self._checked(prompt, check_length)

    def _checked(self, prompt: Prompt, check_length: bool) -> Prompt:
        if check_length and self.max_prompt_tokens is not None:
            check_prompt_length(len(prompt), self.max_prompt_tokens)
        return prompt

    def _build_slots(self, history, candidates, check_length: bool) -> Prompt:
        t = self.template
        blocks = [self.instruction, self.history_block(history),
                  self._block("glue", self.first_lead())]
        slot, lead = self._block("slot", t.slot), self._block("glue", t.next_slot)
        for j, item in enumerate(candidates):
            blocks += [self.item_block(item), slot] + ([lead] if j + 1 < len(candidates) else [])
        blocks.append(self._block("glue", t.fill("slot_question", chat_tail=self.chat_tail)))
        return self._checked(Prompt(tuple(blocks), candidates, (), (), self.close_token, head="slot"), check_length)


def movielens_text(item: Item) -> str:
    """The built-in readers' item text: title (year; genres)."""
    meta = ", ".join(item.genres)
    if item.year is not None:
        meta = f"{item.year}; {meta}" if meta else str(item.year)
    return f"{item.title} ({meta})" if meta else item.title


def check_candidates(candidates: Sequence) -> None:
    """A candidate list must be non-empty and free of duplicates (ValueError naming them)."""
    if not len(candidates):
        raise ValueError("no candidates (the candidate list is empty)")
    if len(set(candidates)) != len(candidates):
        dup = sorted({c for c in candidates if list(candidates).count(c) > 1})
        raise ValueError(f"duplicate candidates: {dup}")


def check_prompt_length(n: int, limit: int, what: str = "the limit") -> None:
    """A prompt of n tokens must fit `limit` (a configured bound, or the model's context)."""
    if n > limit:
        raise ValueError(f"prompt of {n} tokens exceeds {what} of {limit} tokens "
                         "(fewer candidates or a shorter history)")
