"""KV-cache invariants (rollback, catch-up) and truncation (EOS, max_new_tokens, stop strings, stream).

* After any sequence of draft / verify / rollback, a level's cached next-token logits equal a fresh
  full forward on the same prefix, for both runners and for a second architecture (GPT-2).
* After a fully accepted draft, a drafter's next forward runs exactly the tokens it has not seen:
  its own last draft token and the target's bonus token (the catch-up).
* Nothing is emitted past EOS or past ``max_new_tokens``; a stop string ends the text before it;
  streamed chunks add up to the final result.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from csdrafting import CSDraftingError, GenerationInputError
from csdrafting.levels.memo import PrefixMemoLevel, common_prefix_length
from csdrafting.levels.model import model_level
from tiny import (
    KERNEL,
    TableLevel,
    copy_model,
    hf_greedy,
    make_cascade,
    noisy_copy,
    random_table,
    tiny_gpt2,
    tiny_llama,
)

MODELS_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "models"
PROMPT = [5, 17, 33, 2, 81, 40, 7]


@pytest.fixture(scope="module")
def llama():
    target = tiny_llama(0)
    return {"target": target, "copy": copy_model(target), "noisy": noisy_copy(target, 1, 0.02)}


def full_forward(model, ids: list[int]) -> torch.Tensor:
    """transformers' own logits (T, V) for the whole sequence, no cache."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # (T, V)


def fresh_forward(model, runner: str, ids: list[int], kernel: str = KERNEL) -> torch.Tensor:
    """The same runner's logits (T, V) for the whole sequence, from an empty cache."""
    return model_level("fresh", model, runner, kernel=kernel).next_token_logits(ids, len(ids))


# the lean runner keeps float64 in RMSNorm where transformers computes it in float32
# (see test_lean_runner_matches_transformers_in_float64): compare it with transformers loosely
HF_TOLERANCE = {"lean": 1e-4, "transformers": 1e-9}


# -- cache invariants --------------------------------------------------------------------------


def drive_level(
    level: PrefixMemoLevel, model, seed: int, num_ops: int = 40, atol: float = 1e-9, kernel: str = KERNEL
) -> Counter:
    """Random draft / verify / rollback traffic on one level, checking every answer against a
    fresh forward (within ``atol``: a float32 kernel rounds differently at another token count).
    Returns how often each kind of move happened (so the test can check coverage)."""
    rng = random.Random(seed)
    vocab = level.vocab_size
    ids = [rng.randrange(vocab) for _ in range(rng.randint(2, 8))]
    moves = Counter()
    for op in range(num_ops):
        move = rng.choice(["extend", "extend", "rollback", "diverge", "rerun", "prefill"])
        if move == "extend":  # accepted draft plus new draft tokens
            ids = ids + [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]
        elif move == "rollback":  # rejected draft: a strict prefix of what is cached
            ids = ids[: rng.randint(1, len(ids))]
        elif move == "diverge":  # rejected draft replaced by different tokens
            keep = rng.randint(1, len(ids))
            ids = ids[:keep] + [(t + 1) % vocab for t in ids[keep:]] + [rng.randrange(vocab)]
        elif move == "prefill":
            ids = ids + [rng.randrange(vocab) for _ in range(rng.randint(0, 4))]
            before = level.counters.num_tokens_run
            shared = common_prefix_length(level._ids, ids)
            level.prefill(ids)
            assert level.num_cached == len(ids) or not ids
            assert level.counters.num_tokens_run - before == len(ids) - shared
            ids = ids + [rng.randrange(vocab)]
            # fall through to a logits request on top of the prefilled prefix
        ids = ids[: level.max_positions]
        num_positions = rng.randint(1, min(6, len(ids)))
        shared = common_prefix_length(level._ids, ids)
        before = level.counters.num_tokens_run
        logits = level.next_token_logits(ids, num_positions)  # (N, V)
        expected = fresh_forward(model, level.runner_name, ids, kernel)[-num_positions:]
        torch.testing.assert_close(logits, expected, rtol=1e-9, atol=atol, msg=f"op {op} ({move})")
        tolerance = HF_TOLERANCE[level.runner_name]
        torch.testing.assert_close(logits, full_forward(model, ids)[-num_positions:], rtol=0, atol=tolerance)
        assert level.num_cached == len(ids)
        # only the uncached tokens, plus those whose logits were asked for, are run
        assert level.counters.num_tokens_run - before == len(ids) - min(shared, len(ids) - num_positions)
        moves[move] += 1
        moves["fully cached"] += shared == len(ids)
        if op == num_ops // 2:
            level.reset()
            moves["reset"] += 1
    return moves


@pytest.mark.parametrize(
    "runner,kernel", [("lean", "linear"), ("lean", "transposed"), ("transformers", None)], ids=lambda v: str(v)
)
def test_cached_logits_equal_fresh_forward_llama(llama, runner, kernel):
    kernel = kernel or KERNEL  # every float64 kernel (test_kernels.py: the float32 ones)
    for seed in range(3):
        # its own copy, so the runner may take any layout (own_weights)
        level = model_level("t", copy_model(llama["target"]), runner, own_weights=True, kernel=kernel)
        assert level.runner_name == runner
        moves = drive_level(level, llama["target"], seed, kernel=kernel)
        assert min(moves[m] for m in ("extend", "rollback", "diverge", "prefill", "fully cached")) > 0, moves


def test_cached_logits_equal_fresh_forward_gpt2():
    model = tiny_gpt2(0)
    level = model_level("g", model, "auto", kernel=KERNEL)
    assert level.runner_name == "transformers"
    moves = drive_level(level, model, seed=7)
    assert moves["rollback"] > 0 and moves["diverge"] > 0


def test_lean_runner_buffers_grow_without_losing_the_cache():
    """The lean runner preallocates 256 positions and grows: cross that boundary mid-sequence."""
    model = tiny_llama(3, max_positions=600)
    level = model_level("t", model, "lean", kernel=KERNEL)
    rng = random.Random(0)
    ids = [rng.randrange(96) for _ in range(250)]
    level.next_token_logits(ids, 1)
    assert level.runner.capacity == 256
    ids = ids + [rng.randrange(96) for _ in range(20)]  # crosses 256
    expected = fresh_forward(model, "lean", ids)[-3:]
    torch.testing.assert_close(level.next_token_logits(ids, 3), expected, rtol=1e-9, atol=1e-9)
    assert level.runner.capacity > 256
    ids = ids[:240] + [1, 2, 3]  # roll back below the old capacity
    expected = fresh_forward(model, "lean", ids)[-2:]
    torch.testing.assert_close(level.next_token_logits(ids, 2), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(level.next_token_logits(ids, 2), full_forward(model, ids)[-2:], rtol=0, atol=1e-4)


def test_lean_runner_matches_transformers_in_float64(llama):
    ids = PROMPT + [9, 11]
    lean = model_level("t", llama["target"], "lean", kernel=KERNEL).next_token_logits(ids, len(ids))
    torch.testing.assert_close(lean, full_forward(llama["target"], ids), rtol=1e-9, atol=1e-9)


def test_drafter_with_a_shorter_context_than_the_target():
    target = tiny_llama(0, max_positions=64)
    drafter = tiny_llama(1, max_positions=16)
    prompt = list(range(1, 21))  # longer than the drafter's context
    # either a typed error (up front, or for a request the smallest level cannot hold) or exact output
    try:
        cascade = make_cascade(target, [drafter], mag=False, k_matrix=[[2]], runner="lean", eos_token_ids=[])
        tokens = cascade.generate(prompt, 5, ignore_eos=True).token_ids
    except CSDraftingError as exc:
        assert "context" in str(exc)
        return
    assert tokens == hf_greedy(target, prompt, 5)


class RecordingLevel:
    """Wraps a level and records, for every forward, (len(ids), num_positions, tokens run)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[int, int, int]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reset(self) -> None:
        self.inner.reset()
        self.calls = []

    def prefill(self, ids):
        self.inner.prefill(ids)

    def next_token_logits(self, ids, num_positions):
        before = self.inner.counters.num_tokens_run
        logits = self.inner.next_token_logits(ids, num_positions)
        self.calls.append((len(ids), num_positions, self.inner.counters.num_tokens_run - before))
        return logits


@pytest.mark.parametrize("runner", ["lean", "transformers"])
def test_drafter_catches_up_after_a_fully_accepted_draft(llama, runner):
    k = 3
    target = model_level("target", llama["target"], runner, kernel=KERNEL)
    drafter = RecordingLevel(model_level("drafter", llama["copy"], runner, kernel=KERNEL))
    cascade = make_cascade(target, [drafter], mag=False, k_matrix=[[k]], eos_token_ids=[])
    num_new = 4 * (k + 1)
    result = cascade.generate(PROMPT, num_new, ignore_eos=True)
    assert result.token_ids == hf_greedy(llama["target"], PROMPT, num_new)
    assert result.stats.acceptance_rate == 1.0
    calls = drafter.calls
    assert len(calls) == 4 * k  # k single-token drafting forwards per step
    # step 1: the first forward runs the prompt's last token (the rest was prefilled), then one each
    assert calls[0] == (len(PROMPT), 1, 1)
    assert [c[2] for c in calls[1:k]] == [1] * (k - 1)
    for step in range(1, 4):
        first = calls[step * k]
        # the catch-up: the drafter's own last draft token (never run) and the target's bonus token
        assert first[2] == 2, calls
        assert first[0] == len(PROMPT) + step * (k + 1)
        assert [c[2] for c in calls[step * k + 1 : (step + 1) * k]] == [1] * (k - 1)
    # every position the drafter needed was run exactly once: no re-runs, nothing skipped
    assert drafter.counters.num_tokens_run == len(PROMPT) - 1 + 4 * (k + 1) - 1


def test_drafter_rolls_back_after_a_rejection(llama):
    target = model_level("target", llama["target"], "lean", kernel=KERNEL)
    drafter = RecordingLevel(model_level("drafter", llama["noisy"], "lean", kernel=KERNEL))
    cascade = make_cascade(target, [drafter], mag=False, k_matrix=[[4]], eos_token_ids=[])
    result = cascade.generate(PROMPT, 30, ignore_eos=True)
    assert result.token_ids == hf_greedy(llama["target"], PROMPT, 30)
    review = result.stats.levels[0].review
    assert 0 < review.num_accepted < review.num_drafted
    # whatever was rejected, no forward ever re-runs more than the new tokens plus the recovered one:
    # a rejected suffix is dropped from the cache, never recomputed from scratch
    assert all(run <= 2 for _, _, run in drafter.calls), drafter.calls
    assert drafter.counters.num_tokens_run <= len(PROMPT) + 30 + review.num_drafted


# -- truncation: EOS and max_new_tokens --------------------------------------------------------


@pytest.fixture(scope="module")
def eos_case(llama):
    """An EOS id the greedy path produces at a known position (its first occurrence)."""
    reference = hf_greedy(llama["target"], PROMPT, 40)
    position = next(i for i in range(8, 40) if reference[i] not in reference[:i])
    return reference, reference[position], position


CASCADES = {
    "plain": dict(drafters=[], mag=False, k_matrix=None),
    "copy K=6": dict(drafters=["copy"], mag=False, k_matrix=[[6]]),
    "noisy + MaG": dict(drafters=["noisy"], mag=True, k_matrix=[[3, 4], [0, 3]]),
    "copy + noisy + MaG": dict(drafters=["copy", "noisy"], mag=True, k_matrix=[[3, 1, 4], [0, 2, 2], [0, 0, 3]]),
}


def build(llama, name, runner="auto", eos=(), tokenizer=None, lenience=1.0):
    spec = CASCADES[name]
    return make_cascade(
        llama["target"],
        [llama[d] for d in spec["drafters"]],
        tokenizer=tokenizer,
        mag=spec["mag"],
        k_matrix=spec["k_matrix"],
        eos_token_ids=list(eos),
        runner=runner,
        lenience=lenience,
    )


@pytest.mark.parametrize("name", list(CASCADES))
@pytest.mark.parametrize("runner", ["lean", "transformers"])
def test_eos_inside_a_draft_stops_where_plain_decoding_stops(llama, eos_case, name, runner):
    reference, eos, position = eos_case
    result = build(llama, name, runner, eos=[eos]).generate(PROMPT, 40)
    assert result.token_ids == reference[: position + 1]
    assert result.finish_reason == "eos"
    assert result.stats.num_new_tokens == position + 1
    if name == "copy K=6":  # every step emits 7 tokens: the step that reached EOS drafted past it
        assert result.stats.num_target_steps == -(-(position + 1) // 7)
    # transformers agrees on where EOS stops the output
    with torch.no_grad():
        hf = llama["target"].generate(
            torch.tensor([PROMPT]),
            do_sample=False,
            max_new_tokens=40,
            eos_token_id=eos,
            pad_token_id=eos,
            attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
        )
    assert hf[0, len(PROMPT) :].tolist() == result.token_ids
    # ignore_eos keeps going, identical to the reference
    assert build(llama, name, runner, eos=[eos]).generate(PROMPT, 40, ignore_eos=True).token_ids == reference


def test_eos_is_not_cut_when_it_is_drafted_but_rejected():
    """A draft that contains EOS but is rejected before it must not end the generation."""
    vocab = 4
    target_table = torch.zeros(vocab, vocab, vocab, dtype=torch.float64)
    target_table[..., 1] = 5.0  # the target always says 1
    drafter_table = torch.zeros_like(target_table)
    drafter_table[..., 3] = 5.0  # the drafter always says 3 (= EOS)
    target = TableLevel("t", target_table, "bigram")
    drafter = TableLevel("d", drafter_table, "bigram")
    result = make_cascade(target, [drafter], mag=False, k_matrix=[[3]], eos_token_ids=[3]).generate([0, 2], 10)
    assert result.token_ids == [1] * 10 and result.finish_reason == "length"
    assert result.stats.levels[0].review.num_drafted > 0 and result.stats.levels[0].review.num_accepted == 0


@pytest.mark.parametrize("name", ["copy K=6", "copy + noisy + MaG"])
def test_max_new_tokens_is_never_exceeded(llama, name):
    reference = hf_greedy(llama["target"], PROMPT, 12)
    cascade = build(llama, name)
    for max_new in (1, 2, 3, 5, 7, 12):
        result = cascade.generate(PROMPT, max_new, ignore_eos=True)
        assert result.token_ids == reference[:max_new]
        assert result.finish_reason == "length"
        assert result.stats.num_new_tokens == max_new
    # with a copy drafter of K=6 and max_new_tokens=3 a draft + bonus could emit 7: it must be 3,
    # in one target step (the draft was shortened to fit, not truncated after the fact)
    result = build(llama, "copy K=6").generate(PROMPT, 3, ignore_eos=True)
    assert result.stats.num_target_steps == 1 and result.stats.levels[0].review.num_drafted == 2


def test_context_limit_is_respected_to_the_last_position():
    model = tiny_llama(4, max_positions=32)
    prompt = list(range(10, 20))
    reference = hf_greedy(model, prompt, 22)
    for runner in ("lean", "transformers"):
        cascade = make_cascade(
            model, [copy_model(model)], mag=True, k_matrix=[[5, 5], [0, 3]], runner=runner, eos_token_ids=[]
        )
        assert cascade.generate(prompt, 22, ignore_eos=True).token_ids == reference  # fills the context exactly
        with pytest.raises(GenerationInputError):
            cascade.generate(prompt, 23, ignore_eos=True)
        with pytest.raises(GenerationInputError):
            cascade.generate(list(range(32)), 1)


def test_sampling_respects_eos_and_max_new_tokens():
    vocab = 4
    table = random_table(5, vocab, "bigram", scale=1.0)
    target = TableLevel("t", table, "bigram")
    d1 = TableLevel("d1", table + random_table(6, vocab, "bigram"), "bigram")
    d2 = TableLevel("d2", random_table(7, vocab, "bigram"), "bigram")
    cascade = make_cascade(
        target, [d1, d2], mag=True, k_matrix=[[2, 1, 3], [0, 1, 2], [0, 0, 3]], lenience=2.0, eos_token_ids=[3]
    )
    finishes = Counter()
    for seed in range(300):
        result = cascade.generate([0, 1, 2, 0], 6, temperature=1.0, seed=seed)
        ids = result.token_ids
        assert 1 <= len(ids) <= 6
        assert 3 not in ids[:-1]  # nothing after EOS
        assert result.finish_reason == ("eos" if ids[-1] == 3 else "length")
        if result.finish_reason == "length":
            assert len(ids) == 6
        finishes[result.finish_reason] += 1
    assert finishes["eos"] > 20 and finishes["length"] > 20


# -- stop strings and streaming (a real tokenizer with a tiny random model) --------------------


@pytest.fixture(scope="module")
def text_case():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODELS_DIR / "pycode-22m")
    model = tiny_llama(5, vocab_size=len(tokenizer), hidden_size=32)
    prompt = tokenizer("def f(x):\n    return")["input_ids"]
    reference = hf_greedy(model, prompt, 60)
    return {
        "tokenizer": tokenizer,
        "model": model,
        "copy": copy_model(model),
        "prompt": prompt,
        "reference": reference,
        "text": tokenizer.decode(reference, skip_special_tokens=True),
    }


def text_cascade(case, drafters: bool):
    return make_cascade(
        case["model"],
        [case["copy"]] if drafters else [],
        tokenizer=case["tokenizer"],
        mag=drafters,
        k_matrix=[[4, 3], [0, 2]] if drafters else None,
        eos_token_ids=[],
    )


@pytest.mark.parametrize("drafters", [False, True])
def test_text_equals_decoded_tokens(text_case, drafters):
    result = text_cascade(text_case, drafters).generate(text_case["prompt"], 60, ignore_eos=True)
    assert result.token_ids == text_case["reference"]
    assert result.text == text_case["text"]


@pytest.mark.parametrize("drafters", [False, True])
def test_stop_string_ends_the_text_before_it(text_case, drafters):
    text, reference, tokenizer = text_case["text"], text_case["reference"], text_case["tokenizer"]
    cascade = text_cascade(text_case, drafters)
    checked = 0
    for start in range(12, len(text) - 8, 9):
        stop = text[start : start + 4]
        if "\ufffd" in stop or not stop.strip():
            continue
        cut = text.find(stop)
        # the output keeps the tokens up to the one that completes the stop string
        num_tokens = next(
            n for n in range(1, len(reference) + 1) if stop in tokenizer.decode(reference[:n], skip_special_tokens=True)
        )
        result = cascade.generate(text_case["prompt"], 60, ignore_eos=True, stop=["@never@", stop])
        assert result.finish_reason == "stop", stop
        assert result.text == text[:cut], stop
        assert result.token_ids == reference[:num_tokens], stop
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("drafters", [False, True])
@pytest.mark.parametrize("stop", [None, "stop-in-text"])
def test_stream_chunks_add_up_to_the_result(text_case, drafters, stop):
    cascade = text_cascade(text_case, drafters)
    stop_strings = [text_case["text"][30:34]] if stop else None
    result = cascade.generate(text_case["prompt"], 60, ignore_eos=True, stop=stop_strings)
    chunks = list(cascade.stream(text_case["prompt"], 60, ignore_eos=True, stop=stop_strings))
    names = {entry.name for entry in result.stats.levels}
    assert "".join(chunk.text for chunk in chunks) == result.text
    assert [t for chunk in chunks for t in chunk.token_ids] == result.token_ids
    assert all(chunk.level in names for chunk in chunks)
    assert all(chunk.finish_reason is None and chunk.stats is None for chunk in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == result.finish_reason == ("stop" if stop else "length")
    assert last.stats is not None and last.stats.num_new_tokens == len(result.token_ids)
    if drafters:  # chunks say which level drafted their tokens
        assert {chunk.level for chunk in chunks if chunk.token_ids} >= {"target", "drafter1"}
        by_level = Counter()
        for chunk in chunks:
            by_level[chunk.level] += len(chunk.token_ids)
        assert by_level == Counter({e.name: e.num_emitted for e in last.stats.levels if e.num_emitted})


def test_stream_validates_before_the_first_chunk(text_case):
    cascade = text_cascade(text_case, False)
    with pytest.raises(GenerationInputError):
        cascade.stream("", 10)
    with pytest.raises(GenerationInputError):
        cascade.stream(text_case["prompt"], 0)
    with pytest.raises(GenerationInputError):
        cascade.stream(text_case["prompt"], 10, temperature=-1.0)


def test_stop_strings_need_a_tokenizer():
    level = TableLevel("t", random_table(0, 3, "bigram"), "bigram")
    cascade = make_cascade(level, [], mag=False, eos_token_ids=[])
    with pytest.raises(GenerationInputError):
        cascade.generate([0, 1], 3, stop=["x"])
    with pytest.raises(GenerationInputError):
        cascade.generate("text needs a tokenizer", 3)
    with pytest.raises(GenerationInputError):
        cascade.generate([0, 7], 3)  # token id outside the vocabulary
