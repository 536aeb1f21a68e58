"""Greedy identity on the real model family: CS Drafting vs transformers' own greedy decoding.

For every prompt of a JSONL prompt set, compares the tokens of transformers'
``generate(do_sample=False)`` on the target alone with the cascade's tokens for several
K-matrices and lenience values (float32, CPU by default). Exits 1 on any mismatch.

    python scripts/check_identity.py [--prompts benchmarks/prompts.jsonl] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
K_MATRICES = [
    [[2, 1, 4], [0, 1, 3], [0, 0, 3]],
    [[1, 2, 6], [0, 2, 4], [0, 0, 4]],
    [[4, 0, 2], [0, 1, 2], [0, 0, 2]],
    [[3, 3, 0], [0, 2, 5], [0, 0, 6]],
]
LENIENCES = [1.0, 3.0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default=str(ROOT / "benchmarks" / "prompts.jsonl"))
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import csdrafting

    prompts = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(MODELS / "pycode-22m")
    reference_model = AutoModelForCausalLM.from_pretrained(MODELS / "pycode-22m", dtype=torch.float32)
    reference_model = reference_model.to(args.device).eval()
    references = {}
    for prompt in prompts:
        ids = tokenizer(prompt["text"], return_tensors="pt").input_ids.to(args.device)
        with torch.inference_mode():
            out = reference_model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        references[prompt["id"]] = out[0, ids.shape[1] :].tolist()

    drafters = [MODELS / "pycode-5m", MODELS / "pycode-1m"]
    failures = 0
    print(f"{'K-matrix':32s} {'lenience':>8s} {'identical':>10s} {'mean accepted length':>21s}")
    for k_matrix in K_MATRICES:
        for lenience in LENIENCES:
            cascade = csdrafting.Cascade.from_pretrained(
                MODELS / "pycode-22m", drafters, k_matrix=k_matrix, lenience=lenience, device=args.device
            )
            same, mal = 0, 0.0
            for prompt in prompts:
                result = cascade.generate(prompt["text"], max_new_tokens=args.max_new_tokens)
                if result.token_ids == references[prompt["id"]]:
                    same += 1
                else:
                    failures += 1
                    print(f"  MISMATCH {prompt['id']} K={k_matrix} l={lenience}", file=sys.stderr)
                mal += result.stats.tokens_per_target_step / len(prompts)
            print(f"{json.dumps(k_matrix):32s} {lenience:8.1f} {same:>4d}/{len(prompts):<5d} {mal:21.2f}")
    print("all identical" if failures == 0 else f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
