"""Block-structured prompts: the model sees exactly the concatenation of the blocks' tokens, and
that equals tokenizing the whole text (real tokenizer, real catalog)."""

import numpy as np
import pytest

from rcllm_jax.data.movielens import LeaveOneOut, load_dataset
from rcllm_jax.data.prompt import PromptBuilder, labels_for


@pytest.fixture(scope="module")
def split():
    return LeaveOneOut(load_dataset("ml-100k"))


@pytest.fixture(scope="module")
def builder(smollm2, split):
    return PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=20)


def test_block_concatenation_equals_whole_text_tokenization(builder, split, smollm2):
    """Every catalog item appears as a candidate once, across prompts of many users: the
    concatenated block tokens equal the tokenizer's ids for the joined text."""
    items = sorted(split.dataset.items)
    for n, start in enumerate(range(0, len(items), 20)):
        user = split.users[n]
        p = builder.build(split.history(user), items[start:start + 20])
        assert p.tokens.tolist() == smollm2.tokenizer.encode(p.text), (user, start)


def test_block_kinds_and_layout(builder, split):
    user = split.users[0]
    p = builder.build(split.history(user), [1, 2, 3])
    kinds = [b.kind for b in p.blocks]
    assert kinds == ["instruction", "history", "glue", "item", "glue", "item", "glue", "item", "glue"]
    assert [b.item_id for b in p.blocks if b.kind == "item"] == [1, 2, 3]
    assert p.text.endswith("assistant\n(")
    assert p.blocks[2].text.endswith("(A)") and p.blocks[4].text == "\n(B)"
    spans = p.spans()
    assert spans[0][0] == 0 and spans[-1][1] == len(p) and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_item_blocks_are_request_independent(builder, split):
    a = builder.build(split.history(split.users[0]), [50, 181, 1])
    b = builder.build(split.history(split.users[1]), [1, 7, 50, 9])
    ia = {blk.item_id: blk for blk in a.blocks if blk.kind == "item"}
    ib = {blk.item_id: blk for blk in b.blocks if blk.kind == "item"}
    assert ia[50] == ib[50] and ia[1] == ib[1]
    assert "Toy Story" in ia[1].text and "(" not in ia[1].text.split("(")[0][-2:]


def test_history_keeps_the_last_h_items(smollm2, split):
    b3 = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=3)
    user = split.users[0]
    hist = split.history(user)
    block = b3.history_block(hist)
    expected = [b3.item_text(split.dataset.items[i]) for i in hist[-3:]]
    assert block.text.splitlines() == expected
    assert PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=0).history_block(hist).text == "(none)\n"


def test_labels():
    assert labels_for(3) == ("A", "B", "C")
    assert labels_for(26)[-1] == "Z" and labels_for(27)[-1] == "a" and labels_for(52)[-1] == "z"
    assert labels_for(53)[:3] == ("1", "2", "3") and labels_for(100)[-1] == "100"


def test_letter_labels_are_single_tokens_numbers_are_not(builder, split, smollm2):
    user = split.users[0]
    assert builder.build(split.history(user), range(1, 21)).single_token_labels
    p52 = builder.build(split.history(user), range(1, 53))
    assert p52.single_token_labels and p52.tokens.tolist() == smollm2.tokenizer.encode(p52.text)
    p = builder.build(split.history(user), range(1, 61))
    assert not p.single_token_labels and len(p.label_tokens[11]) == 2  # "12" -> "1", "2"
    assert p.tokens.tolist() == smollm2.tokenizer.encode(p.text)


@pytest.mark.parametrize("cands,match", [([], "no candidates"), ([1, 2, 1], "duplicate candidates: \\[1\\]"),
                                         ([1, 99999], "unknown item id 99999")])
def test_bad_candidate_lists(builder, cands, match):
    with pytest.raises((ValueError, KeyError), match=match):
        builder.build([1, 2], cands)


def test_too_long_prompt_is_refused(smollm2, split):
    b = PromptBuilder(smollm2.tokenizer, split.dataset.items, max_prompt_tokens=200)
    with pytest.raises(ValueError, match="exceeds the limit of 200"):
        b.build(split.history(split.users[0]), range(1, 21))


def test_prompt_tokens_are_int32_array(builder):
    p = builder.build([1], [2, 3])
    assert isinstance(p.tokens, np.ndarray) and p.tokens.dtype == np.int32 and len(p.tokens) == len(p)


def test_slot_prompts_tokenize_like_their_text_over_the_catalog(split, smollm2):
    """Slot prompts (no labels; a recomputed slot token ends each candidate's line): every catalog
    item as a candidate once, digit-initial titles included ("\\n" + " 20,000" would merge into one
    token without the bullet glue); one slot per candidate, at the end of its line."""
    b = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=20, head="slot")
    items = sorted(split.dataset.items)
    for n, start in enumerate(range(0, len(items), 20)):
        p = b.build(split.history(split.users[n]), items[start:start + 20])
        assert p.tokens.tolist() == smollm2.tokenizer.encode(p.text), start
        assert p.head == "slot" and len(p.slot_positions) == len(p.candidates) and p.labels == ()
        assert all(p.tokens[i] == smollm2.tokenizer.encode("\n")[0] for i in p.slot_positions)
    assert "Candidates:\n- " in p.text and p.text.count("\n- ") == len(p.candidates)


@pytest.mark.parametrize("head", ["label", "slot"])
def test_first_lead_is_what_precedes_the_first_item(split, smollm2, head):
    """Item blocks are encoded after the instruction + `first_lead()` (the engine's default canonical
    context): in a real prompt the first item block follows exactly that glue, and with score slots
    every later item block follows the same token (the bullet), so no cached item token has a left
    context it never has in a prompt."""
    b = PromptBuilder(smollm2.tokenizer, split.dataset.items, history_len=5, head=head)
    lead = smollm2.tokenizer.encode(b.first_lead())
    assert smollm2.tokenizer.decode(lead) == ("Candidates:\n-" if head == "slot" else "Candidates:\n(A)")
    cands = sorted(split.dataset.items)[:6]
    p = b.build(split.history(split.users[0]), cands)
    toks, starts = p.tokens.tolist(), [s for (s, _), blk in zip(p.spans(), p.blocks) if blk.kind == "item"]
    assert len(starts) == len(cands) and toks[starts[0] - len(lead):starts[0]] == lead
    if head == "slot":
        assert {toks[s - 1] for s in starts} == {lead[-1]}
