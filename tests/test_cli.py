"""The ``csd`` command, run in-process through ``csdrafting.cli.main(argv)``.

One real generation on the embedded pycode models (checked token for token against transformers'
greedy ``generate`` of the target), then every user error: exit status 2 and a single
``error: ...`` line on stderr, never a traceback. Error cases load the small pycode-1m as target
to stay cheap.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from csdrafting.cli import main
from csdrafting.levels.mag import BigramTable

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
TARGET = MODELS_DIR / "pycode-22m"
SMALL = str(MODELS_DIR / "pycode-1m")
PROMPT = "def f("


def run(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def reference_tokens():
    """transformers' greedy decoding of pycode-22m (float32, as the CLI's default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TARGET)
    model = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=8,
        )
    tokens = out[0, len(ids) :].tolist()
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True)


def test_generate_with_no_model_flags_from_outside_the_repository(capsys, reference_tokens, tmp_path, monkeypatch):
    """The embedded family and its default configuration are package data: found from any folder."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, ["generate", "--prompt", PROMPT, "--max-new-tokens", 8, "--json"])
    assert code == 0, err
    assert json.loads(out)["token_ids"] == reference_tokens[0]


def test_generate_json_on_the_embedded_models(capsys, reference_tokens):
    code, out, err = run(capsys, ["generate", "--prompt", PROMPT, "--max-new-tokens", 8, "--json"])
    assert code == 0, err
    payload = json.loads(out)
    tokens, text = reference_tokens
    assert payload["token_ids"] == tokens
    assert payload["text"] == text
    assert payload["finish_reason"] in ("length", "eos")
    stats = payload["stats"]
    assert stats["num_new_tokens"] == len(tokens) == 8
    names = [level["name"] for level in stats["levels"]]
    # the shipped default configuration (models/csd_default.json) picks the levels
    default = json.loads((MODELS_DIR / "csd_default.json").read_text())
    assert names == ["pycode-22m", *default["drafters"], "mag"]
    assert stats["levels"][0]["review"]["num_drafted"] > 0  # the cascade really drafted
    assert sum(level["num_emitted"] for level in stats["levels"]) == 8
    assert payload["config"]["target"] == "pycode-22m" and payload["config"]["mag"] is True


def test_generate_plain_text_and_stream_agree(capsys):
    base = ["generate", "--target", SMALL, "--prompt", PROMPT, "--max-new-tokens", 12]
    code, plain, err = run(capsys, base)
    assert code == 0 and "tokens" in err  # the summary line goes to stderr
    code, streamed, err = run(capsys, base + ["--stream"])
    assert code == 0 and "finish" in err
    assert streamed == plain and plain.strip()
    code, out, _ = run(capsys, base + ["--json", "--no-mag"])
    assert json.loads(out)["text"] + "\n" == plain


def test_prompt_file_and_sampling_flags(capsys, tmp_path):
    prompt_file = tmp_path / "prompt.py"
    prompt_file.write_text(PROMPT, encoding="utf-8")
    argv = [
        "generate",
        "--target",
        SMALL,
        "--prompt-file",
        prompt_file,
        "--max-new-tokens",
        6,
        "--json",
        "--temperature",
        0.8,
        "--top-k",
        20,
        "--top-p",
        0.9,
        "--seed",
        3,
    ]
    code, first, err = run(capsys, argv)
    assert code == 0, err
    code, second, _ = run(capsys, argv)
    assert json.loads(first)["token_ids"] == json.loads(second)["token_ids"]  # seeded: reproducible


def test_no_command_prints_help(capsys):
    code, out, _ = run(capsys, [])
    assert code == 2 and "generate" in out


# -- user errors ---------------------------------------------------------------------------------


def assert_user_error(capsys, argv, fragment: str):
    code, out, err = run(capsys, argv)
    assert code == 2, (argv, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert fragment.lower() in lines[0].lower(), lines[0]


GEN = ["generate", "--target", SMALL, "--prompt", PROMPT]

ERRORS = [
    (["generate", "--target", "/no/such/model", "--prompt", PROMPT], "no model at"),
    (["generate", "--prompt", PROMPT, "--drafter", "/no/such/drafter"], "no model at"),
    (GEN + ["--k-matrix", "[[1,2"], "K-matrix"),
    (GEN + ["--k-matrix", "2,1;1"], "K-matrix"),  # 2x2 given, MaG alone needs 1x1
    (GEN + ["--k-matrix", "-1"], "K-matrix"),
    (GEN + ["--lenience", 0.5], "lenience"),
    (GEN + ["--lenience", "nan"], "lenience"),
    (GEN + ["--temperature", -0.5], "temperature"),
    (GEN + ["--top-p", 0], "top_p"),
    (GEN + ["--top-p", 1.5], "top_p"),
    (GEN + ["--top-k", 0], "top_k"),
    (GEN + ["--max-new-tokens", 0], "max_new_tokens"),
    (GEN + ["--max-new-tokens", -3], "max_new_tokens"),
    (GEN + ["--seed", -1], "seed"),
    (GEN + ["--dtype", "float8"], "dtype"),
    (GEN + ["--device", "tpu"], "device"),
    (GEN + ["--bigram", "/no/such/table.npy"], "bigram"),
    (["generate", "--target", SMALL, "--prompt", ""], "prompt is empty"),
    (["generate", "--target", SMALL], "no prompt"),
    (GEN + ["--max-new-tokens", 4000], "context"),
    (GEN + ["--threads", 0], "--threads"),
    (["bench", "--threads", -1], "--threads"),
]


@pytest.mark.parametrize("argv,fragment", ERRORS, ids=[" ".join(map(str, e[0][3:])) or "no-prompt" for e in ERRORS])
def test_user_errors_exit_2_with_one_line(capsys, argv, fragment):
    assert_user_error(capsys, argv, fragment)


def test_threads_flag_sets_torch_threads(capsys):
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    try:
        code, _, err = run(capsys, GEN + ["--threads", wanted, "--max-new-tokens", 2])
        assert code == 0, err
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


def test_prompt_and_prompt_file_together(capsys, tmp_path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("x = 1\n")
    assert_user_error(capsys, GEN + ["--prompt-file", prompt_file], "not both")
    assert_user_error(
        capsys, ["generate", "--target", SMALL, "--prompt-file", tmp_path / "missing.txt"], "cannot read prompt file"
    )


def test_prompt_longer_than_the_context(capsys, tmp_path):
    prompt_file = tmp_path / "long.py"
    prompt_file.write_text("".join(f"value_{i} = {i} * {i}\n" for i in range(600)))  # > 2048 tokens
    assert_user_error(
        capsys,
        ["generate", "--target", SMALL, "--prompt-file", prompt_file, "--max-new-tokens", 4],
        "context is 2048 tokens",
    )


def save_tiny_model(folder: Path, vocab_size: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def test_drafter_with_a_different_tokenizer(capsys, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(64)}
    vocab["[UNK]"] = 64
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "other-tokenizer"
    save_tiny_model(folder, 65)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    assert_user_error(capsys, GEN + ["--drafter", folder], "different tokenizer")


def test_drafter_with_a_different_vocabulary_size(capsys, tmp_path):
    """Same tokenizer files, but a model whose vocabulary is smaller than the target's."""
    folder = tmp_path / "small-vocab"
    save_tiny_model(folder, 8000)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODELS_DIR / "pycode-1m" / name, folder / name)
    assert_user_error(capsys, GEN + ["--drafter", folder], "vocabulary")
    # without tokenizer files the vocabulary size check still catches it
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert_user_error(capsys, GEN + ["--drafter", folder], "vocabulary")


# -- build-bigram ---------------------------------------------------------------------------------


def test_build_bigram(capsys, tmp_path):
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus"
    (corpus / "pkg").mkdir(parents=True)
    texts = ["def add(a, b):\n    return a + b\n", "import os\nimport sys\n\nprint(os.sep)\n"]
    for i, text in enumerate(texts):
        (corpus / "pkg" / f"m{i}.py").write_text(text)
    (corpus / "notes.txt").write_text("not python")  # not collected: wrong suffix
    output = tmp_path / "bigram.npy"
    code, out, err = run(capsys, ["build-bigram", "--tokenizer", SMALL, "--output", output, corpus])
    assert code == 0, err
    assert "wrote" in out
    table = BigramTable.load(output)
    tokenizer = AutoTokenizer.from_pretrained(SMALL)
    expected = BigramTable.from_token_ids([tokenizer(t)["input_ids"] for t in texts], len(tokenizer))
    np.testing.assert_array_equal(table.next_token, expected.next_token)
    assert table.fallback_token == expected.fallback_token and table.vocab_size == 8192
    assert_user_error(
        capsys, ["build-bigram", "--tokenizer", SMALL, "--output", output, tmp_path / "missing"], "not found"
    )


# -- the same validation through the Python API ----------------------------------------------------


def test_api_validation():
    from csdrafting import ConfigError, GenerationInputError, ModelLoadError
    from tiny import TableLevel, make_cascade, random_table

    target = TableLevel("t", random_table(0, 4, "bigram"), "bigram")
    for lenience in (0.5, True, float("inf"), "2"):
        with pytest.raises(ConfigError, match="lenience"):
            make_cascade(target, [], lenience=lenience, eos_token_ids=[])
    with pytest.raises(ConfigError, match="runner"):
        make_cascade(target, [], runner="fast", eos_token_ids=[])
    with pytest.raises(ModelLoadError, match="vocabulary"):
        make_cascade(target, [TableLevel("d", random_table(1, 3, "bigram"), "bigram")], eos_token_ids=[])
    with pytest.raises(ConfigError, match="NeuralLevel"):
        make_cascade(target, [object()], eos_token_ids=[])
    cascade = make_cascade(target, [], mag=True, eos_token_ids=[])
    for bad in (
        dict(max_new_tokens=0),
        dict(max_new_tokens=True),
        dict(max_new_tokens=2.0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_k=-2),
        dict(stop=[3]),
        dict(stop=[""]),
        dict(stop=""),
    ):
        with pytest.raises(GenerationInputError):
            cascade.generate([0, 1], **{"max_new_tokens": 3, **bad})
    for prompt in ([], [0, -1], [0, 4], "text without a tokenizer", [0.5, "a"]):
        with pytest.raises(GenerationInputError):
            cascade.generate(prompt, 3)


def test_names_must_match_the_levels():
    from csdrafting import ConfigError
    from tiny import TableLevel, make_cascade, random_table

    levels = [TableLevel(f"l{i}", random_table(i, 4, "bigram"), "bigram") for i in range(3)]
    with pytest.raises(ConfigError):
        make_cascade(levels[0], levels[1:], names=["target", "only-one-drafter"], mag=False, eos_token_ids=[])


def test_drafter_window_flag(capsys):
    """--drafter-window reaches the configuration (and --json's config); the output is unchanged."""
    prompt = "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser("
    base = ["generate", "--target", MODELS_DIR / "pycode-5m", "--drafter", SMALL, "--k-matrix", "[[2,1],[0,1]]"]
    base += ["--prompt", prompt, "--max-new-tokens", 8, "--json"]
    code, out, _ = run(capsys, [*base, "--drafter-window", 4])
    assert code == 0
    windowed = json.loads(out)
    assert windowed["config"]["drafter_window"] == 4
    code, out, _ = run(capsys, base)
    assert code == 0 and json.loads(out)["config"]["drafter_window"] is None
    assert json.loads(out)["token_ids"] == windowed["token_ids"]
    code, _, err = run(capsys, [*base, "--drafter-window", 0])
    assert code == 2 and err.startswith("error: ") and "drafter_window must be a positive integer" in err
