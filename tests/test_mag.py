"""MaG (Max-Gram) proposals and its bigram fallback table.

Hand-built cases for each rule, then a differential test against a brute-force reference that
rescans the committed tokens for every proposal (what the incremental index must be equivalent to).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from csdrafting import ConfigError
from csdrafting.levels.mag import BigramTable, MaG
from tiny import TableLevel, make_cascade, random_table

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


def propose(ids, num_tokens, num_committed=None, bigram=None, max_ngram=12):
    mag = MaG(bigram, max_ngram=max_ngram)
    return mag.propose(list(ids), len(ids) if num_committed is None else num_committed, num_tokens).tokens


def table(mapping: dict[int, int], vocab_size: int = 16, fallback: int = 0) -> BigramTable:
    next_token = np.full(vocab_size, -1)
    for token, successor in mapping.items():
        next_token[token] = successor
    return BigramTable(next_token, fallback)


def test_longest_suffix_match_wins():
    # [2] last occurred before 8, but the longer suffix [1, 2] occurred before 9
    assert propose([1, 2, 9, 3, 2, 8, 4, 1, 2], 1) == [9]
    # a 3-gram beats 2-grams that are more recent
    assert propose([5, 1, 2, 7, 1, 2, 8, 5, 1, 2], 1) == [7]


def test_most_recent_occurrence_wins():
    assert propose([1, 2, 5, 1, 2, 6, 3, 1, 2], 1) == [6]
    assert propose([4, 0, 4, 1, 4, 2, 4], 1) == [2]


def test_a_match_contributes_its_whole_continuation():
    assert propose([1, 2, 3, 4, 5, 9, 1, 2], 3) == [3, 4, 5]


def test_bigram_fallback_then_search_again():
    bigram = table({7: 1})
    # 7 never occurred before: the bigram table says 1, and [1] continues as 2, 3
    assert propose([1, 2, 3, 7], 3, bigram=bigram) == [1, 2, 3]
    # a token the table does not know: its fallback token
    assert propose([1, 2, 3, 11], 1, bigram=table({}, fallback=5)) == [5]
    # no table at all: repeat the last token
    assert propose([1, 2, 3, 7], 3) == [7, 7, 7]


def test_proposals_never_read_past_the_context():
    # the only match's continuation runs into the end of the context: it is cut there and the
    # search starts again from the extended suffix; the proposal still has the requested length
    ids = [4, 5, 6, 4, 5]
    out = propose(ids, 6)
    assert len(out) == 6 and out[:3] == [6, 4, 5]
    for seed in range(50):
        rng = random.Random(seed)
        ids = [rng.randrange(4) for _ in range(rng.randint(1, 12))]
        out = propose(ids, rng.randint(1, 9))
        assert all(0 <= t < 4 for t in out)


def test_draft_tokens_are_not_indexed():
    committed, draft = [1, 2, 3], [7, 8, 7]
    # [7] occurs in the draft (followed by 8) but the draft is not prompt or output yet
    assert propose(committed + draft, 1, num_committed=3) == [7]
    # ... the draft does take part in the suffix being looked up
    assert propose([7, 9, 1, 2, 3] + [7], 1, num_committed=5) == [9]
    # once committed, it is indexed
    assert propose(committed + draft, 1, num_committed=6) == [8]


def test_max_ngram_limits_the_suffix():
    ids = [1, 2, 3, 9, 5, 2, 3, 8, 1, 2, 3]
    assert propose(ids, 1, max_ngram=3) == [9]  # [1, 2, 3] matched
    assert propose(ids, 1, max_ngram=2) == [8]  # only [2, 3]: its most recent occurrence
    with pytest.raises(ConfigError):
        MaG(max_ngram=0)


def reference_propose(ids, num_committed, num_tokens, max_ngram, bigram):
    """Brute force: rescan the committed tokens for the longest, most recent suffix match."""
    committed = ids[:num_committed]
    proposal: list[int] = []
    while len(proposal) < num_tokens:
        tail = (ids + proposal)[-max_ngram:]
        match_end = None
        for n in range(len(tail), 0, -1):
            gram = tail[-n:]
            # an occurrence needs a committed successor: it ends at most at num_committed - 2
            ends = [e for e in range(n - 1, num_committed - 1) if committed[e - n + 1 : e + 1] == gram]
            if ends:
                match_end = max(ends)
                break
        if match_end is not None:
            proposal += ids[match_end + 1 : match_end + 1 + num_tokens - len(proposal)]
        elif bigram is not None:
            proposal.append(bigram(tail[-1]))
        else:
            proposal.append(tail[-1])
    return proposal


@pytest.mark.parametrize("with_bigram", [False, True])
def test_incremental_index_matches_brute_force(with_bigram):
    """One MaG object through whole simulated generations (growing committed prefix, drafts in
    progress, a new sequence now and then) agrees with the brute force at every call."""
    checked = 0
    for seed in range(30):
        rng = random.Random(seed)
        vocab = rng.choice([3, 5, 8])
        bigram = BigramTable.from_token_ids([[rng.randrange(vocab) for _ in range(30)]], vocab) if with_bigram else None
        max_ngram = rng.choice([1, 2, 3, 12])
        mag = MaG(bigram, max_ngram=max_ngram)
        committed = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]
        for _ in range(25):
            draft = [rng.randrange(vocab) for _ in range(rng.randint(0, 4))]
            ids = committed + draft
            num_tokens = rng.randint(1, 6)
            expected = reference_propose(ids, len(committed), num_tokens, max_ngram, bigram)
            assert mag.propose(ids, len(committed), num_tokens).tokens == expected, (seed, ids, len(committed))
            checked += 1
            if rng.random() < 0.1:
                committed = [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]  # a new generation
            else:
                committed = committed + draft[: rng.randint(0, len(draft))] + [rng.randrange(vocab)]
    assert checked == 750


def test_reset_forgets_the_previous_sequence():
    mag = MaG()
    assert mag.propose([1, 2, 9, 1, 2], 5, 1).tokens == [9]
    mag.reset()
    assert mag.propose([1, 2], 2, 1).tokens == [2]  # nothing indexed from before
    assert mag.propose([3, 4, 5, 3], 4, 1).tokens == [4]  # a different sequence re-indexes from scratch
    assert mag.propose([1, 2, 9, 1, 2], 5, 1).tokens == [9]


def test_proposal_reports_the_match_length_of_its_first_token():
    mag = MaG()
    assert mag.propose([1, 2, 9, 3, 2, 8, 4, 1, 2], 1, 1).match_length == 0  # nothing indexed: committed 1
    assert MaG().propose([1, 2, 9, 3, 2, 8, 4, 1, 2], 9, 3).match_length == 2  # [1, 2] occurred before 9
    assert MaG().propose([5, 6, 7], 3, 2).match_length == 0  # no earlier occurrence: a fallback


# -- the bigram table ----------------------------------------------------------------------------


def test_bigram_table_picks_the_most_frequent_successor():
    tab = BigramTable.from_token_ids([[1, 2, 1, 3, 1, 3], [1, 2], [4, 4, 4, 1, 2], []], 6)
    # successors of 1: 2 three times, 3 twice
    assert tab(1) == 2
    assert tab(3) == 1 and tab(4) == 4 and tab(2) == 1
    # 0 and 5 never had a successor: the most frequent token overall (1, five times)
    assert tab.next_token[0] == -1 and tab(0) == 1 and tab(5) == 1 and tab.fallback_token == 1
    assert tab(99) == 1 and tab(-1) == 1  # out of range: fallback
    assert tab.vocab_size == 6


def test_bigram_ties_go_to_the_smallest_id():
    tab = BigramTable.from_token_ids([[0, 3, 0, 2, 0, 5, 0, 2, 0, 3]], 6)
    assert tab(0) == 2  # 2 and 3 twice each
    tab = BigramTable.from_token_ids([[4, 1, 1, 4, 4]], 6)  # 4 three times, 1 twice
    assert tab.fallback_token == 4
    assert BigramTable.from_token_ids([[2, 1, 1, 2]], 3).fallback_token == 1  # 1 and 2 twice each
    assert BigramTable.from_token_ids([], 4).fallback_token == 0


def test_bigram_table_matches_brute_force():
    for seed in range(40):
        rng = random.Random(seed)
        vocab = rng.choice([2, 5, 9])
        seqs = [[rng.randrange(vocab) for _ in range(rng.randint(0, 15))] for _ in range(rng.randint(1, 4))]
        tab = BigramTable.from_token_ids(seqs, vocab)
        for token in range(vocab):
            counts = {}
            for seq in seqs:
                for a, b in zip(seq, seq[1:]):
                    if a == token:
                        counts[b] = counts.get(b, 0) + 1
            expected = min(counts, key=lambda b: (-counts[b], b)) if counts else -1
            assert tab.next_token[token] == expected, (seed, token)
        unigram = [sum(seq.count(t) for seq in seqs) for t in range(vocab)]
        assert tab.fallback_token == unigram.index(max(unigram))


def test_bigram_save_load_round_trip(tmp_path):
    tab = BigramTable.from_token_ids([[1, 2, 1, 3, 1, 3, 7]], 9)
    path = tmp_path / "bigram.npy"
    tab.save(path)
    loaded = BigramTable.load(path)
    np.testing.assert_array_equal(loaded.next_token, tab.next_token)
    assert loaded.fallback_token == tab.fallback_token and loaded.vocab_size == 9
    assert [loaded(t) for t in range(-1, 11)] == [tab(t) for t in range(-1, 11)]


def test_bigram_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 3), dtype=np.int32))
    with pytest.raises(ConfigError):
        BigramTable.load(bad)
    text = tmp_path / "text.npy"
    text.write_text("not numpy")
    with pytest.raises(ConfigError):
        BigramTable.load(text)
    with pytest.raises(ConfigError):
        BigramTable.load(tmp_path / "missing.npy")


def test_shipped_bigram_table_covers_the_pycode_vocabulary():
    path = MODELS_DIR / "pycode-22m" / "csd_bigram.npy"
    if not path.is_file():
        pytest.skip("no shipped bigram table")
    tab = BigramTable.load(path)
    assert tab.vocab_size == 8192
    assert (tab.next_token >= -1).all() and (tab.next_token < 8192).all() and (tab.next_token >= 0).sum() > 1000


def test_cascade_refuses_a_bigram_table_of_another_vocabulary():
    level = TableLevel("t", random_table(0, 4, "bigram"), "bigram")
    with pytest.raises(ConfigError):
        make_cascade(level, [], mag=True, bigram=BigramTable.from_token_ids([[1, 2]], 5), eos_token_ids=[])
