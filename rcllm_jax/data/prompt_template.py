"""A ranking prompt's text, block by block: the default (the prompt the shipped head was trained on)
or a TOML preset (`--prompt=FILE.toml`, `configs/prompts/`).

Each field is the text of one kind of block, so what is cached and what is computed per request is
explicit (engine/plan.py decides from the block kinds, never from the text):

  instruction     the chat header (from `system` and the model's chat template) + `instruction`:
                  one block per template, cached in every user's prefix
  history_item    one line per history item (`{item}`) -> the user's history block, cached per user;
                  `empty_history` when there is none
  item            one candidate's text (`{item}`): encoded once per catalog item, shared by every
                  request, so it may name nothing but the item
  first_label, next_label, label_question      (label head) the glue before the first candidate
                  and before each later one (`{label}`: A, B, ...) and the closing question that
                  ends where the answer's label starts; `label_close` follows a label
  first_slot, slot, next_slot, slot_question   (score-slot head) the glue before the first
                  candidate, the one-token slot that ends each candidate (read by the head), the
                  glue before each later one, the closing question

`{chat_tail}` (the model's chat footer up to the assistant turn) must end each question. A
placeholder a block kind cannot carry is refused with the reason: an item or history line that
depends on the request or the user cannot be cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
import tomllib
from pathlib import Path


class TemplateError(ValueError):
    """A prompt template that cannot be used, with the field and the reason."""


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    system: str = ("You are a movie recommender. From the movies a user watched, pick the one movie "
                   "from a list of candidates that they will watch next.")
    instruction: str = "Movies I watched, oldest first:\n"
    history_item: str = "{item}\n"
    empty_history: str = "(none)\n"
    item: str = " {item}"
    first_label: str = "Candidates:\n({label})"
    next_label: str = "\n({label})"
    label_question: str = "\nWhich candidate will I watch next? Answer with its label.{chat_tail}("
    label_close: str = ")"
    first_slot: str = "Candidates:\n-"
    slot: str = "\n"
    next_slot: str = "-"
    slot_question: str = "Which candidate will I watch next?{chat_tail}"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str):
                raise TemplateError(f"prompt field {f.name!r} must be text, got {type(value).__name__}")
            found = _placeholders(f.name, value)
            allowed, required = _RULES.get(f.name, ((), ()))
            bad = sorted(found - set(allowed))
            if bad:
                raise TemplateError(f"prompt field {f.name!r}: placeholder {{{bad[0]}}} "
                                    + _REASONS.get((f.name, bad[0]), _REASONS.get(bad[0], _unknown(allowed))))
            missing = [name for name in required if name not in found]
            if missing:
                raise TemplateError(f"prompt field {f.name!r} must contain {{{missing[0]}}} ({_NEEDED[missing[0]]})")

    def fill(self, field: str, **values) -> str:
        """The text of `field` with its placeholders filled."""
        return getattr(self, field).format(**values)

    def digest(self) -> str:
        """Content hash of every field (what a head or a cache built for this prompt records)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# field -> (placeholders it may carry, placeholders it must carry)
_RULES = {
    "history_item": (("item",), ("item",)),
    "item": (("item",), ("item",)),
    "first_label": (("label",), ("label",)),
    "next_label": (("label",), ("label",)),
    "label_question": (("chat_tail",), ("chat_tail",)),
    "slot_question": (("chat_tail",), ("chat_tail",)),
}
_NEEDED = {"item": "the item's text", "label": "the candidate's label the answer names",
           "chat_tail": "the model's chat footer, which opens the assistant's answer"}
_REQUEST = ("depends on the request, but this block is encoded once and shared by every request "
            "(item blocks per catalog item, history per user, the instruction per template)")
_REASONS = {
    "label": "names a candidate's label, which " + _REQUEST,
    "user": "names the user, which " + _REQUEST,
    "user_id": "names the user, which " + _REQUEST,
    "history": "names the history, which " + _REQUEST,
    "position": "names a candidate's position, which " + _REQUEST,
    ("instruction", "item"): "names an item, but the instruction is one block shared by every prompt",
    ("system", "item"): "names an item, but the system text is one block shared by every prompt",
}


def _unknown(allowed) -> str:
    return "is not known" + (f" (this field takes {', '.join('{' + a + '}' for a in allowed)})" if allowed
                             else " (this field takes no placeholder; write {{ and }} for literal braces)")


def _placeholders(field: str, text: str) -> set[str]:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise TemplateError(f"prompt field {field!r}: {e} (write {{{{ and }}}} for literal braces)") from None
    found = set()
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise TemplateError(f"prompt field {field!r}: placeholder {{{name}{'!' + conv if conv else ''}"
                                f"{':' + spec if spec else ''}}} must be a plain name")
        found.add(name)
    return found


DEFAULT_TEMPLATE = PromptTemplate()


def load_template(path: str | Path | None) -> PromptTemplate:
    """The template of a TOML preset (a `[prompt]` table whose keys are `PromptTemplate` fields;
    fields left out keep the default's text), or the default for None."""
    if path is None:
        return DEFAULT_TEMPLATE
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise TemplateError(f"prompt preset {path}: {e}") from None
    table = data.get("prompt")
    if not isinstance(table, dict) or set(data) != {"prompt"}:
        raise TemplateError(f"prompt preset {path}: expected one [prompt] table, found {sorted(data) or 'nothing'}")
    known = {f.name for f in dataclasses.fields(PromptTemplate)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise TemplateError(f"prompt preset {path}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    try:
        return PromptTemplate(**table)
    except TemplateError as e:
        raise TemplateError(f"prompt preset {path}: {e}") from None
