"""Dataset readers on fixture files in each layout, the leave-one-out split, candidate sampling."""

import collections

import numpy as np
import pytest

from rcllm_jax.data.movielens import (DataFormatError, LeaveOneOut, load_dataset, read_grouplens_100k,
                                      read_ml1m, read_recbole_atomic, sample_candidates)

# (user, item, rating, time): user 1 has a timestamp tie (items 5 and 3 at t=200)
RATINGS = [(1, 5, 4, 200), (1, 3, 5, 200), (1, 1, 3, 100), (1, 2, 4, 300), (1, 4, 2, 400),
           (2, 2, 5, 50), (2, 1, 4, 40), (2, 6, 3, 60), (3, 1, 4, 10), (3, 2, 4, 20)]
TITLES = {1: ("Toy Story (1995)", "Animation|Comedy"), 2: ("GoldenEye (1995)", "Action|Thriller"),
          3: ("Café Society (1995)", "Drama"), 4: ("Seven (Se7en) (1995)", "Crime|Thriller"),
          5: ("Heat (1995)", "Action"), 6: ("Untitled", "")}
EXPECTED_USER1 = (1, 3, 5, 2, 4)  # chronological, tie at t=200 broken by item id


def write_atomic(d):
    (d / "ml-100k.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" +
                                     "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    rows = []
    for i, (t, g) in TITLES.items():
        title, _, year = t.rpartition(" (") if t.endswith(")") else (t, "", "")
        rows.append(f"{i}\t{title}\t{year.rstrip(')')}\t{g.replace('|', ' ')}\n")
    (d / "ml-100k.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                    + "".join(rows), encoding="utf-8")


def write_grouplens(d):
    genres = ["unknown", "Action", "Animation", "Comedy", "Crime", "Drama", "Thriller"]
    (d / "u.genre").write_text("".join(f"{g}|{k}\n" for k, g in enumerate(genres)), encoding="latin-1")
    (d / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    lines = []
    for i, (t, g) in TITLES.items():
        flags = ["1" if name in g.split("|") else "0" for name in genres]
        lines.append(f"{i}|{t}|01-Jan-1995||http://x|" + "|".join(flags) + "\n")
    (d / "u.item").write_text("".join(lines), encoding="latin-1")


def write_ml1m(d):
    (d / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    (d / "movies.dat").write_text("".join(f"{i}::{t}::{g}\n" for i, (t, g) in TITLES.items()), encoding="latin-1")


@pytest.mark.parametrize("layout,writer,reader", [
    ("atomic", write_atomic, read_recbole_atomic), ("grouplens", write_grouplens, read_grouplens_100k),
    ("ml1m", write_ml1m, read_ml1m)])
def test_readers_agree_on_every_layout(tmp_path, layout, writer, reader):
    writer(tmp_path)
    ds = reader(tmp_path)
    assert ds.sequences[1] == EXPECTED_USER1
    assert ds.sequences[2] == (1, 2, 6)
    assert ds.num_interactions == len(RATINGS)
    assert ds.items[3].title == "Café Society" and ds.items[3].year == 1995
    assert ds.items[4].title == "Seven (Se7en)"
    assert ds.items[1].genres == ("Animation", "Comedy")
    assert ds.items[6].year is None and ds.items[6].genres == ()
    assert load_dataset("ml-1m" if layout == "ml1m" else "ml-100k", tmp_path).sequences == ds.sequences


def test_malformed_file_names_the_line(tmp_path):
    write_ml1m(tmp_path)
    with open(tmp_path / "ratings.dat", "a") as f:
        f.write("7::8::9\n")
    with pytest.raises(DataFormatError, match=r"ratings.dat:11"):
        read_ml1m(tmp_path)


def test_interaction_with_unknown_item_is_refused(tmp_path):
    write_ml1m(tmp_path)
    with open(tmp_path / "ratings.dat", "a") as f:
        f.write("3::99::4::30\n")
    with pytest.raises(ValueError, match="99"):
        read_ml1m(tmp_path)


def test_leave_one_out(tmp_path):
    write_ml1m(tmp_path)
    sp = LeaveOneOut(read_ml1m(tmp_path))
    assert sp.users == (1, 2)  # user 3 has 2 interactions < 3
    assert sp.target(1, "test") == 4 and sp.history(1, "test") == (1, 3, 5, 2)
    assert sp.target(1, "valid") == 2 and sp.history(1, "valid") == (1, 3, 5)
    assert sp.train_sequence(2) == (1,)
    assert sp.popularity == collections.Counter({1: 2, 3: 1, 5: 1})


@pytest.fixture(scope="module")
def ml100k():
    return LeaveOneOut(load_dataset("ml-100k"))


def test_real_ml100k_shape(ml100k):
    ds = ml100k.dataset
    assert (len(ds.items), len(ds.sequences), ds.num_interactions) == (1682, 943, 100000)
    assert len(ml100k.users) == 943


@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
def test_candidates_properties(ml100k, strategy):
    for user in ml100k.users[:50]:
        target = ml100k.target(user)
        c = sample_candidates(ml100k, user, target, 20, strategy, seed=3)
        assert len(c) == 20 and len(set(c)) == 20 and target in c
        rated = set(ml100k.dataset.sequences[user])
        assert all(i not in rated for i in c if i != target)
        assert c == sample_candidates(ml100k, user, target, 20, strategy, seed=3)
    assert c != sample_candidates(ml100k, user, target, 20, strategy, seed=4)


def test_popularity_sampling_prefers_popular_items(ml100k):
    def mean_pop(strategy):
        pops = []
        for user in ml100k.users[:100]:
            t = ml100k.target(user)
            pops += [ml100k.popularity.get(i, 0) for i in sample_candidates(ml100k, user, t, 20, strategy) if i != t]
        return np.mean(pops)
    assert mean_pop("popularity") > 2 * mean_pop("uniform")


def test_target_position_is_shuffled(ml100k):
    pos = [sample_candidates(ml100k, u, ml100k.target(u), 20).index(ml100k.target(u)) for u in ml100k.users[:200]]
    assert len(set(pos)) > 15  # not always first


def test_min_interactions_filters_items_then_users_by_hand():
    """LlamaRec's filter, one pass each: items with < 2 interactions go, then users left with < 2."""
    from rcllm_jax.data.movielens import Dataset, Item, min_interactions
    items = {i: Item(i, f"m{i}", None, ()) for i in range(1, 6)}
    seqs = {1: (1, 2, 3), 2: (1, 4), 3: (2, 5), 4: (1, 2)}  # counts 1:3 2:3 3:1 4:1 5:1
    times = {u: tuple(float(10 * u + j) for j in range(len(s))) for u, s in seqs.items()}
    got = min_interactions(Dataset("hand", items, seqs, times=times), 2)
    assert sorted(got.items) == [1, 2] and got.sequences == {1: (1, 2), 4: (1, 2)}  # users 2, 3 keep one each
    assert got.times == {1: (10.0, 11.0), 4: (40.0, 41.0)} and got.name == "hand-min2"
    with pytest.raises(ValueError, match=">= 1"):
        min_interactions(got, 0)
