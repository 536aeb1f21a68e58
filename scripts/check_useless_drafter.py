"""Done-when check: with a useless drafter, the adaptive cascade is no slower than plain decoding
by more than 5%.

Builds a drafter with pycode-5m's architecture and *random* weights (it agrees with the target
about as often as chance), saves it with the real tokenizer to a temporary folder, and measures
on the committed prompts, interleaved, warm-up excluded, fixed length (EOS ignored), greedy:

* plain: our runner's plain autoregressive decoding of pycode-22m;
* adaptive: pycode-22m + the random drafter, no MaG, ``adaptive=True`` (the default K-matrix as
  a starting point, adapted online; speculation switched off when it does not pay).

Prints the per-trial and median time ratio adaptive / plain, the drafter's activity, and
whether the outputs were identical. Exit status 1 if the median ratio exceeds --max-ratio.

    .venv/bin/python scripts/check_useless_drafter.py --threads 1
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from csdrafting import Cascade  # noqa: E402
from csdrafting.prompts import load_prompts  # noqa: E402
from csdrafting.tune.compare import Method, compare  # noqa: E402


def random_drafter(folder: Path, seed: int) -> Path:
    """pycode-5m's config with freshly initialised weights, and the family's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(REPO / "models" / "pycode-5m")
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(REPO / "models" / "pycode-5m").save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default=str(REPO / "benchmarks" / "prompts.jsonl"))
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--max-ratio", type=float, default=1.05)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = Path(tempfile.mkdtemp(prefix="csd-random-drafter-"))
    try:
        random_drafter(folder, args.seed)
        cascade = Cascade.from_pretrained(REPO / "models" / "pycode-22m", [folder], mag=False, adaptive=True)
        prompts = load_prompts(args.prompts, args.num_prompts)
        prompts_ids = [cascade.encode(p["text"]) for p in prompts]
        methods = [
            Method("plain", (), ()),
            Method("adaptive", (1,), tuple(tuple(r) for r in cascade.k_matrix.as_lists()), adaptive=True),
        ]
        print(
            f"target pycode-22m, drafter: random weights with pycode-5m's config; {len(prompts)} prompts x "
            f"{args.max_new_tokens} tokens, greedy, {args.trials} trials, {torch.get_num_threads()} threads; "
            f"adaptive starts from K = {cascade.k_matrix}",
            flush=True,
        )
        results = compare(
            cascade, methods, prompts_ids, args.max_new_tokens, args.trials, log=lambda m: print(m, flush=True)
        )
        plain, adaptive = results["plain"], results["adaptive"]
        ratios = [a / p for a, p in zip(adaptive.seconds, plain.seconds)]
        median = statistics.median(ratios)
        print(f"plain:    {plain.tokens_per_second:.1f} tokens/s (median of trials)")
        print(
            f"adaptive: {adaptive.tokens_per_second:.1f} tokens/s, {adaptive.tokens_per_step:.3f} tokens per target "
            f"step, outputs identical to plain: {adaptive.mismatches == 0}"
        )
        # how much drafting the adaptive schedule still did, on one more generation
        probe = cascade.with_config(cascade.config)  # a fresh schedule over the same levels
        stats = probe.generate(prompts_ids[0], args.max_new_tokens, ignore_eos=True).stats
        drafter = stats.levels[1]
        review = stats.levels[0].review
        print(
            f"one fresh generation: {stats.num_target_steps} target steps, {drafter.num_forwards} drafter forwards, "
            f"{review.num_drafted} drafted, {review.num_accepted} accepted"
        )
        print("time ratio adaptive / plain per trial: " + ", ".join(f"{r:.3f}" for r in ratios))
        verdict = "PASS" if median <= args.max_ratio else "FAIL"
        print(f"median ratio: {median:.3f} (bar: <= {args.max_ratio}) {verdict}")
        return 0 if median <= args.max_ratio else 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
