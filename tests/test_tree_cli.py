"""``csd generate --tree`` / ``--tree-budget``, in-process on the embedded pycode models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csdrafting.cli import main

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
SMALL = str(MODELS_DIR / "pycode-1m")
PROMPT = "def f(x):\n    return x\n\ndef g(x):\n    return"


def run(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def generate(capsys, *flags):
    argv = ["generate", "--target", SMALL, "--prompt", PROMPT, "--max-new-tokens", 24, "--ignore-eos", "--json"]
    code, out, err = run(capsys, argv + list(flags))
    assert code == 0, err
    return json.loads(out)


def test_tree_flags_keep_greedy_output_and_report_tree_stats(capsys):
    plain = generate(capsys, "--no-mag")
    tree = generate(capsys, "--tree-budget", 6, "--k-matrix", "[[3]]")
    assert tree["token_ids"] == plain["token_ids"]
    assert tree["config"]["tree"] is True and tree["config"]["tree_budget"] == 6
    stats = tree["stats"]["levels"][0]["tree"]
    assert stats["num_trees"] > 0 and stats["num_nodes"] <= 6 * stats["num_trees"]
    assert generate(capsys, "--tree")["config"]["tree"] is True


@pytest.mark.parametrize(
    "flags,fragment",
    [(["--tree", "--no-mag"], "needs MaG"), (["--tree-budget", "0"], "tree_budget must be")],
)
def test_tree_flag_errors_are_one_line(capsys, flags, fragment):
    code, out, err = run(capsys, ["generate", "--target", SMALL, "--prompt", PROMPT, *flags])
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
