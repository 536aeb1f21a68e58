"""Shared helpers for the tests: tiny enumerable language models and tiny real transformers models.

``TableLevel`` is a table-lookup language model implementing the ``NeuralLevel`` protocol
(``csdrafting.levels.base``): its next-token logits depend only on (position, last token) or on
the last two tokens, so the exact joint law of a few generated tokens can be enumerated.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy import stats

from csdrafting import Cascade, CascadeConfig, EngineParams, Levels, verify
from csdrafting.edge import default_kernel
from csdrafting.levels.memo import PrefixMemoLevel
from csdrafting.sampling import SamplingParams, warp
from csdrafting.tree import TreeParams


class TableRunner:
    """A ``Runner`` whose forward pass is a table lookup (see ``TableLevel``)."""

    runner_name = "table"
    device = torch.device("cpu")
    dtype = torch.float64

    def __init__(self, table: torch.Tensor, mode: str, max_positions: int) -> None:
        assert mode in ("position", "bigram")
        self.table = table.to(torch.float64)
        self.mode = mode
        self.vocab_size = int(table.shape[-1])
        self.max_positions = max_positions if mode == "bigram" else min(max_positions, int(table.shape[0]))
        self.num_params = int(table.numel())
        self.ids: list[int] = []  # the sequence the pretend cache holds

    def logits_after(self, ids: list[int]) -> torch.Tensor:
        """(V,) next-token logits after the context ``ids``."""
        if self.mode == "position":
            return self.table[len(ids) - 1, ids[-1]]
        prev = ids[-2] if len(ids) >= 2 else ids[-1]
        return self.table[prev, ids[-1]]

    def forward(self, token_ids: list[int], start: int, num_logits: int) -> torch.Tensor:
        assert start <= len(self.ids), "a memo level never starts past what it cached"
        self.ids = self.ids[:start] + list(token_ids)
        assert len(self.ids) <= self.max_positions
        end = len(self.ids)
        rows = [self.logits_after(self.ids[: end - num_logits + i + 1]) for i in range(num_logits)]
        return torch.stack(rows) if rows else torch.empty(0, self.vocab_size, dtype=torch.float64)  # (N, V)


class TableLevel(PrefixMemoLevel):
    """A language model that is a lookup table, behind the same prefix memo as a real model.

    mode "position": ``table`` (P, V, V); the logits after ``ids`` are ``table[len(ids) - 1, ids[-1]]``.
    mode "bigram":   ``table`` (V, V, V); the logits after ``ids`` are ``table[ids[-2], ids[-1]]``
                     (a single-token context uses ``ids[-1]`` twice).
    """

    def __init__(self, name: str, table: torch.Tensor, mode: str = "position", max_positions: int = 64) -> None:
        super().__init__(name, TableRunner(table, mode, max_positions))
        self.table = self.runner.table
        self.mode = mode

    def logits_after(self, ids: list[int]) -> torch.Tensor:
        return self.runner.logits_after(ids)


# the lean runner's kernel in every test: $CSDRAFTING_KERNEL, "linear" unless the run sets another
# (conftest), so that no test times kernels; test_kernels.py runs each kernel itself
KERNEL = default_kernel()


def make_cascade(
    target,
    drafters=(),
    tokenizer=None,
    *,
    names=None,
    runner="auto",
    bigram=None,
    eos_token_ids=None,
    params=None,
    **fields,
) -> Cascade:
    """A cascade over models or levels built in memory; ``fields`` are ``CascadeConfig`` fields,
    ``params`` the engine's (``EngineParams``)."""
    levels = Levels.from_models(
        target,
        drafters,
        tokenizer,
        names=names,
        runner=runner,
        kernel=KERNEL,
        bigram=bigram,
        eos_token_ids=eos_token_ids,
    )
    config = CascadeConfig(
        target=levels.sources[0], drafters=levels.sources[1:], runner=runner, kernel=KERNEL, **fields
    )
    return Cascade(levels, config, params=params)


# every candidate in every tree, whatever the clock says: the most branches for a verifier to get wrong
FULL_TREES = EngineParams(tree=TreeParams(explore_every=1))


def random_table(seed: int, vocab_size: int, mode: str = "position", positions: int = 16, scale: float = 1.5):
    """Random logits for a TableLevel (float64)."""
    g = torch.Generator().manual_seed(seed)
    shape = (positions, vocab_size, vocab_size) if mode == "position" else (vocab_size,) * 3
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def exact_joint(level: TableLevel, prompt: list[int], num_tokens: int, params: SamplingParams) -> dict:
    """{(t1, .., tn): probability} of the next ``num_tokens`` tokens under the level's warped law."""
    out = {}
    vocab = range(level.vocab_size)
    for seq in itertools.product(vocab, repeat=num_tokens):
        prob = 1.0
        ids = list(prompt)
        for token in seq:
            probs = warp(level.logits_after(ids).unsqueeze(0), params)[0]
            prob *= float(probs[token])
            ids.append(token)
            if prob == 0.0:
                break
        out[seq] = prob
    return out


def chisquare_pvalue(counts: dict, expected_probs: dict, min_expected: float = 20.0) -> float:
    """Pearson chi-square p-value of observed ``counts`` against ``expected_probs``.

    Outcomes with probability 0 must never be observed (any such observation returns 0.0).
    Outcomes whose expected count is below ``min_expected`` are pooled into one bin (many cells
    with small expected counts give the statistic a heavier tail than the chi-square law).
    """
    total = sum(counts.values())
    for outcome in counts:
        if expected_probs.get(outcome, 0.0) == 0.0 and counts[outcome] > 0:
            return 0.0
    observed, expected = [], []
    pool_obs, pool_exp = 0, 0.0
    for outcome, prob in expected_probs.items():
        if prob == 0.0:
            continue
        exp = prob * total
        if exp < min_expected:
            pool_obs += counts.get(outcome, 0)
            pool_exp += exp
        else:
            observed.append(counts.get(outcome, 0))
            expected.append(exp)
    if pool_exp > 0:
        observed.append(pool_obs)
        expected.append(pool_exp)
    observed = np.asarray(observed, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    expected *= observed.sum() / expected.sum()  # absorb float round-off of the probabilities
    if len(observed) < 2:
        return 1.0
    return float(stats.chisquare(observed, expected).pvalue)


# -- deliberately broken reviewers (the statistical tests must reject them) ----------------------


_REAL_REVIEW_SAMPLED = verify.review_sampled  # the mutants below must not call a patched-in mutant


def broken_reviewer(accept_rule="exact", after_reject="residual", carry="exact"):
    """A speculative-sampling reviewer with one rule swapped for a plausible mistake."""

    def review(reviewer_probs, draft_ids, draft_probs, generator, lenience=1.0):
        num_draft = len(draft_ids)
        if num_draft == 0:
            return _REAL_REVIEW_SAMPLED(reviewer_probs, draft_ids, draft_probs, generator, lenience)
        draft_probs = draft_probs.to(reviewer_probs.dtype)
        rows = range(num_draft)
        p_x = torch.stack([reviewer_probs[i, x] for i, x in zip(rows, draft_ids)])
        q_x = torch.stack([draft_probs[i, x] for i, x in zip(rows, draft_ids)])
        if accept_rule == "exact":
            accept = torch.where(q_x > 0, torch.clamp(lenience * p_x / q_x.clamp_min(1e-300), max=1), 0.0)
        elif accept_rule == "p_only":  # ignore q: accept with probability p(x)
            accept = p_x
        uniform = torch.rand(num_draft, generator=generator, dtype=reviewer_probs.dtype)
        ok = (uniform < accept).tolist()
        n = ok.index(False) if False in ok else num_draft
        if n == num_draft:
            token = int(torch.multinomial(reviewer_probs[n], 1, generator=generator))
        else:
            p, q = reviewer_probs[n], draft_probs[n]
            if after_reject == "residual":
                law = verify.residual(p, q, lenience)
            elif after_reject == "p":  # resample from p instead of the residual
                law = p
            elif after_reject == "p_without_x":  # the point-mass rule applied to any q
                law = p.clone()
                law[draft_ids[n]] = 0
            elif after_reject == "swapped":  # max(0, q - p)
                law = (q - p).clamp_min(0)
            token = int(torch.multinomial(law, 1, generator=generator))
        num_positions = n + (0 if n == num_draft else 1)
        if carry == "p" or lenience == 1.0:  # carry the reviewer's p even when lenient
            token_probs = reviewer_probs[: n + 1]
        else:
            pi = verify.induced_probs(reviewer_probs[:num_positions], draft_probs[:num_positions], lenience)
            token_probs = pi if n < num_draft else torch.cat([pi, reviewer_probs[num_draft : num_draft + 1]])
        return verify.ReviewOutcome(n, token, token_probs)

    return review


# -- a plain sequential reference and its mutants (one rule each, each a plausible mistake) ------


def sequential_tree_verifier(mutant: str | None = None):
    """Recursive rejection sampling written the slow, literal way; ``mutant`` breaks one rule."""

    def verify_tree(probs, tokens, parents, draft_laws, generator):
        children = verify.tree_children(parents)
        path, row = [], 0
        while True:
            p = probs[row]
            chosen = None
            last_tried = None
            for child in children[row]:
                x = tokens[child]
                for i, law in enumerate(draft_laws[child]):
                    q = law if law is not None else torch.nn.functional.one_hot(torch.tensor(x), p.shape[-1]).double()
                    # the mutant tries a merged duplicate (a node's second candidate) against the
                    # node's own p, as if the first try of that token had not happened
                    law_p = probs[row] if mutant == "duplicate_tried_twice" and i > 0 else p
                    accept = min(1.0, float(law_p[x] / q[x])) if q[x] > 0 else 0.0
                    last_tried = child
                    if float(torch.rand((), generator=generator, dtype=torch.float64)) < accept:
                        chosen = child
                        break
                    if mutant != "p_not_updated":
                        p = verify.residual(p, q)
                if chosen is not None:
                    break
            if chosen is None:
                if mutant == "residual_from_wrong_node" and last_tried is not None:
                    p = verify.residual(probs[last_tried + 1], torch.zeros_like(p))
                return verify.TreeOutcome(path, int(torch.multinomial(p, 1, generator=generator)))
            path.append(chosen)
            row = chosen + 1

    return verify_tree


# -- tiny real transformers models --------------------------------------------------------------


def tiny_llama(
    seed: int,
    vocab_size: int = 96,
    hidden_size: int = 48,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    init: float = 0.3,
    eos_token_id: int | None = None,
    max_positions: int = 256,
    tied: bool = False,
    dtype: torch.dtype = torch.float64,
):
    """A randomly initialised LlamaForCausalLM (peaky logits, so greedy has few near-ties);
    ``tied``: the output layer is the embedding table."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int, vocab_size: int = 96, hidden_size: int = 48, init: float = 0.3):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=2,
        n_head=4,
        n_positions=256,
        initializer_range=init,
        bos_token_id=None,
        eos_token_id=None,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(torch.float64).eval()


def copy_model(model, dtype: torch.dtype = torch.float64):
    """An independent copy with identical weights."""
    clone = type(model)(model.config).to(dtype).eval()
    clone.load_state_dict(model.state_dict())
    return clone


def noisy_copy(model, seed: int, scale: float):
    """The model's weights plus Gaussian noise of ``scale`` times each tensor's std."""
    clone = copy_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clone.parameters():
            std = float(param.std()) if param.numel() > 1 else 1.0
            param.add_(torch.randn(param.shape, generator=g, dtype=param.dtype) * std * scale)
    return clone


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with transformers' own ``generate`` (no EOS stopping)."""
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_ids) :].tolist()


def llama_family(prompt_ids: list[int], max_new_tokens: int, noise: float) -> dict:
    """A tiny llama target, its plain greedy output after ``prompt_ids``, and drafters that always
    agree (its copy), rarely agree (another seed) and often agree (a copy with ``noise``)."""
    target = tiny_llama(0)
    return {
        "target": target,
        "reference": hf_greedy(target, prompt_ids, max_new_tokens),
        "copy": copy_model(target),
        "random": tiny_llama(99),
        "noisy": noisy_copy(target, 1, noise),
    }


# -- "auto" planning (autoplan.py) in tests ------------------------------------------------------


def synthetic_calibrate(costs: dict[str, tuple[float, float]], calls: list | None = None):
    """A stand-in for ``AutoPlanner.calibrate``: level name -> (seconds of a one-token forward,
    seconds per further token); no timing, so plans are deterministic. ``calls`` counts uses."""
    from csdrafting.tune.planner import CostModel, LevelCost

    def calibrate(self, rounds=None, tokens=None):
        if calls is not None:
            calls.append(self)
        names = [self.family.target.name] + [d.name for d in self.family.drafters]
        levels = tuple(LevelCost(n, (1, 64), (costs[n][0], costs[n][0] + 63 * costs[n][1])) for n in names)
        return CostModel(levels, mag_seconds=1e-5, step_seconds=1e-4)

    return calibrate


def plan_automatically(monkeypatch, cache_dir, costs: dict | None = None, calls: list | None = None) -> None:
    """Turn ``"auto"`` planning on for one test (the suite runs with it off), with its cache in
    ``cache_dir`` and, given ``costs``, synthetic forward costs instead of timing."""
    from csdrafting.autoplan import AutoPlanner
    from csdrafting.edge import ENV_AUTO_PLAN

    monkeypatch.setenv(ENV_AUTO_PLAN, "on")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_dir))
    if costs is not None:
        monkeypatch.setattr(AutoPlanner, "calibrate", synthetic_calibrate(costs, calls))
