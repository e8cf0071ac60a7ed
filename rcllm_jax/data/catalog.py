"""Any item catalog: a directory of items, interactions and a `catalog.toml` (`--catalog=DIR`).

    items.jsonl | items.csv | items.parquet        an id column (opaque strings) and any text fields
    interactions.csv | interactions.parquet | <name>.inter (RecBole atomic, tab-separated)
                                                   user, item, timestamp columns (rating optional)
    catalog.toml                                   how to read them:

        name = "shop"                              # default: the directory's name
        item_template = "{title} by {brand} ({category})"   # an item's text in a prompt
        max_item_tokens = 64                       # optional: the text cut to this many tokens
        genres = "category"                        # optional: a field whose "|"-separated values
                                                   #   are the item's genres (genre-matched negatives)
        prompt = "prompt.toml"                     # optional: the prompt preset (relative to DIR)
        [columns]                                  # optional: the files' column names
        id = "id"; user = "user"; item = "item"; timestamp = "timestamp"; rating = "rating"

Ids stay what the catalog calls them (`Item.key`, `Dataset.user_keys`): the API, request logs and
the state database carry them; inside, the engine numbers items and users 1..N in the natural
order of their ids (digit strings by value, then the rest as text), so MovieLens written in this
format numbers them as the built-in readers do. Timestamps are numbers (seconds) or ISO 8601
dates. Every problem is a `CatalogError` naming the file, the line (or Parquet row) and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import string
import tomllib
from pathlib import Path

from rcllm_jax.data.movielens import Dataset, DataFormatError, Item, _sequences

ITEM_FILES = ("items.jsonl", "items.csv", "items.parquet")
INTERACTION_FILES = ("interactions.csv", "interactions.parquet")
COLUMNS = {"id": "id", "user": "user", "item": "item", "timestamp": "timestamp", "rating": "rating"}
SPEC_KEYS = {"name", "item_template", "max_item_tokens", "genres", "prompt", "columns"}


class CatalogError(DataFormatError):
    """A catalog file that cannot be read as one, naming the file, the line and the field."""


@dataclasses.dataclass(frozen=True)
class CatalogSpec:
    name: str
    item_template: str
    max_item_tokens: int | None = None
    genres: str | None = None
    prompt: str | None = None
    columns: dict = dataclasses.field(default_factory=lambda: dict(COLUMNS))

    def template_fields(self) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(self.item_template) if name]


def read_spec(directory: Path) -> CatalogSpec:
    """catalog.toml of a catalog directory, checked."""
    path = directory / "catalog.toml"
    if not path.exists():
        raise CatalogError(f"{path}: not found (a catalog directory needs catalog.toml with item_template)")
    try:
        data = tomllib.loads(_text(path))
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{path}: {e}") from None
    unknown = sorted(set(data) - SPEC_KEYS)
    if unknown:
        raise CatalogError(f"{path}: unknown key {unknown[0]!r}; known: {', '.join(sorted(SPEC_KEYS))}")
    template = data.get("item_template")
    if not isinstance(template, str) or not template.strip():
        raise CatalogError(f"{path}: item_template must be a non-empty string, e.g. \"{{title}} by {{brand}}\"")
    try:
        fields = [n for _, n, _, _ in string.Formatter().parse(template) if n is not None]
    except ValueError as e:
        raise CatalogError(f"{path}: item_template: {e}") from None
    if not fields or not all(f.isidentifier() for f in fields):
        raise CatalogError(f"{path}: item_template must name item fields as {{field}}, got {template!r}")
    columns = data.get("columns", {})
    if not isinstance(columns, dict) or set(columns) - set(COLUMNS) or not all(
            isinstance(v, str) and v for v in columns.values()):
        raise CatalogError(f"{path}: [columns] maps {', '.join(COLUMNS)} to column names (strings)")
    cap = data.get("max_item_tokens")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise CatalogError(f"{path}: max_item_tokens must be a positive integer, got {cap!r}")
    prompt = data.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str) or not (directory / prompt).exists():
            raise CatalogError(f"{path}: prompt preset {prompt!r} not found in {directory}")
        prompt = str(directory / prompt)
    genres = data.get("genres")
    if genres is not None and not isinstance(genres, str):
        raise CatalogError(f"{path}: genres names one item field, got {genres!r}")
    return CatalogSpec(str(data.get("name") or directory.resolve().name), template, cap, genres, prompt,
                       {**COLUMNS, **columns})


def _text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise CatalogError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None


def _rows(path: Path):
    """(where, {column: value or None}) per record of a JSONL, CSV or Parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            raise CatalogError(f"{path}: not a readable Parquet file ({e})") from None
        for n, row in enumerate(table.to_pylist()):
            yield f"{path} row {n}", row
    elif path.suffix == ".jsonl":
        for n, line in enumerate(_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CatalogError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise CatalogError(f"{path}:{n}: each line must be a JSON object, got {type(row).__name__}")
            yield f"{path}:{n}", row
    else:
        delimiter = "\t" if path.suffix == ".inter" else ","
        reader = csv.reader(io.StringIO(_text(path), newline=""), delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise CatalogError(f"{path}: empty file (expected a header line)")
        if path.suffix == ".inter":  # RecBole atomic files: "name:type" headers
            header = [h.split(":")[0] for h in header]
        for row in reader:
            n = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise CatalogError(f"{path}:{n}: {len(row)} fields, the header has {len(header)}")
            yield f"{path}:{n}", dict(zip(header, row))


def _one(directory: Path, names, what: str) -> Path:
    found = [directory / n for n in names if (directory / n).exists()]
    if len(found) != 1:
        raise CatalogError(f"{directory}: expected exactly one {what} file ({' | '.join(names)}), found "
                           f"{[p.name for p in found] or 'none'}")
    return found[0]


def _id(value, where: str, column: str) -> str:
    if value is None or isinstance(value, bool) or isinstance(value, float) or str(value).strip() == "":
        raise CatalogError(f"{where}: field {column!r}: an id must be a non-empty string or integer, got {value!r}")
    return str(value)


def _natural(key: str):
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def _timestamp(value, where: str, column: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    text = str(value or "").strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CatalogError(f"{where}: field {column!r}: cannot parse timestamp {text!r} "
                           "(seconds or ISO 8601)") from None
    return (t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)).timestamp()


def _read_items(path: Path, spec: CatalogSpec) -> dict[str, tuple[dict, str]]:
    """key -> (fields, where) of every item, checked."""
    col, out = spec.columns["id"], {}
    fields = spec.template_fields()
    for where, row in _rows(path):
        if col not in row:
            raise CatalogError(f"{where}: no id column {col!r} (columns: {sorted(row)}; set [columns] id in "
                               "catalog.toml)")
        key = _id(row[col], where, col)
        if key in out:
            raise CatalogError(f"{where}: duplicate item id {key!r} (first at {out[key][1]})")
        for f in fields:
            if row.get(f) is None:
                raise CatalogError(f"{where}: item {key!r} lacks field {f!r} used by item_template "
                                   f"{spec.item_template!r}")
        if spec.genres is not None and spec.genres not in row:
            raise CatalogError(f"{where}: item {key!r} lacks the genres field {spec.genres!r}")
        out[key] = (row, where)
    if not out:
        raise CatalogError(f"{path}: no items")
    return out


def _read_interactions(path: Path, spec: CatalogSpec, items: dict):
    """(user key, item key, seconds) per interaction, checked against the items."""
    c = spec.columns
    for where, row in _rows(path):
        for role in ("user", "item", "timestamp"):
            if c[role] not in row:
                raise CatalogError(f"{where}: no {role} column {c[role]!r} (columns: {sorted(row)}; set "
                                   f"[columns] {role} in catalog.toml)")
        user = _id(row[c["user"]], where, c["user"])
        item = _id(row[c["item"]], where, c["item"])
        if item not in items:
            raise CatalogError(f"{where}: field {c['item']!r}: unknown item {item!r} (not in the items file)")
        yield user, item, _timestamp(row[c["timestamp"]], where, c["timestamp"])


def read_catalog(directory: str | Path) -> Dataset:
    """The `Dataset` of a catalog directory (module docstring); `CatalogError` naming the file,
    line and field of anything it cannot use. Reading changes nothing on disk."""
    d = Path(directory)
    if not d.is_dir():
        raise CatalogError(f"catalog directory {d} does not exist")
    spec = read_spec(d)
    raw = _read_items(_one(d, ITEM_FILES, "items"), spec)
    inter = [d / n for n in INTERACTION_FILES] + sorted(d.glob("*.inter"))
    rows = list(_read_interactions(_one(d, [p.name for p in inter], "interactions"), spec, raw))
    item_index = {k: n for n, k in enumerate(sorted(raw, key=_natural), 1)}
    items = {}
    for key, (row, _) in raw.items():
        values = {k: "" if v is None else str(v) for k, v in row.items()}
        text = spec.item_template.format(**values).strip()
        genres = () if spec.genres is None else tuple(g.strip() for g in values[spec.genres].split("|") if g.strip())
        i = item_index[key]
        items[i] = Item(i, values.get("title") or text, None, genres, key=key, text=text)
    users = {k: n for n, k in enumerate(sorted({u for u, _, _ in rows}, key=_natural), 1)}
    interactions = _sequences((users[u], item_index[i], ts) for u, i, ts in rows)
    return Dataset(spec.name, dict(sorted(items.items())), **interactions, user_keys={n: k for k, n in users.items()},
                   prompt=spec.prompt, max_item_tokens=spec.max_item_tokens)


def load_catalog(catalog) -> Dataset:
    """The dataset a launcher's `CatalogSettings` names: a catalog directory (`--catalog`), else a
    built-in MovieLens reader (`--dataset`, `--data_dir`); with `--min_interactions` > 1 only the
    items, then the users, with that many interactions (`movielens.min_interactions`)."""
    from rcllm_jax.data.movielens import load_dataset, min_interactions
    ds = read_catalog(catalog.catalog) if catalog.catalog else load_dataset(catalog.dataset, catalog.data_dir)
    return min_interactions(ds, catalog.min_interactions) if catalog.min_interactions > 1 else ds


def write_catalog(ds: Dataset, directory: str | Path) -> Path:
    """Write a dataset as a catalog directory that `read_catalog` reads back to the same items,
    users, sequences and item texts (how the MovieLens readers become presets of this format):
    items.jsonl (id, title, text: the prompt's item text, genres "|"-joined), interactions.csv
    (user, item, timestamp: the interaction's time, or its position in the user's sequence for a
    dataset without times) and catalog.toml (item_template "{text}"). Written into a temporary
    directory beside `directory` and renamed into place; an existing `directory` is refused."""
    import os
    import shutil
    import tempfile

    from rcllm_jax.data.prompt import movielens_text
    out = Path(directory)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new directory (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
            for _, it in sorted(ds.items.items()):
                f.write(json.dumps({"id": str(it.id), "title": it.title, "text": it.text or movielens_text(it),
                                    "genres": "|".join(it.genres)}, ensure_ascii=False) + "\n")
        with open(tmp / "interactions.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["user", "item", "timestamp"])
            for u, seq in sorted(ds.sequences.items()):
                times = range(len(seq)) if ds.times is None else ds.times[u]
                w.writerows((ds.user_key(u), str(ds.items[i].id), _time_text(t)) for t, i in zip(times, seq))
        toml = [f"name = {json.dumps(ds.name)}", 'item_template = "{text}"', 'genres = "genres"']
        if ds.max_item_tokens:
            toml.append(f"max_item_tokens = {ds.max_item_tokens}")
        (tmp / "catalog.toml").write_text("\n".join(toml) + "\n", encoding="utf-8")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _time_text(t) -> str:
    """A time as the interactions file writes it: an integer where it is one."""
    return str(int(t)) if float(t).is_integer() else repr(float(t))


def keep_indices(new: Dataset, old_items: dict) -> Dataset:
    """`new` (a catalog read again) with every item of `old_items` (index -> Item) at its old
    engine index, and new items after the largest: an index a queued request carries names the
    same item across a reload of the catalog."""
    import dataclasses
    at = {str(it.id): i for i, it in old_items.items()}
    nxt, remap = max(old_items, default=0) + 1, {}
    for i, it in sorted(new.items.items()):
        j = at.get(str(it.id))
        if j is None:
            j, nxt = nxt, nxt + 1
        remap[i] = j
    items = {remap[i]: dataclasses.replace(it, item_id=remap[i]) for i, it in new.items.items()}
    return dataclasses.replace(new, items=dict(sorted(items.items())),
                               sequences={u: tuple(remap[i] for i in s) for u, s in new.sequences.items()})


def prompt_builder(tokenizer, ds: Dataset, catalog, **kw):
    """The `PromptBuilder` for a dataset under a launcher's `CatalogSettings`: its history length,
    the prompt preset (--prompt, else the catalog's own) and the catalog's item-text cap."""
    from rcllm_jax.data.prompt import PromptBuilder
    from rcllm_jax.data.prompt_template import load_template
    kw.setdefault("history_len", catalog.history_len)
    return PromptBuilder(tokenizer, ds.items, template=load_template(catalog.prompt or ds.prompt),
                         max_item_tokens=ds.max_item_tokens, **kw)
