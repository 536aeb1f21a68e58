"""``backend="llama.cpp"``: loading through ``CascadeConfig``, the GGUF conversion cache, the
tokenizer over a GGUF's vocabulary, mixed backends, bad input, and losslessness on llama.cpp levels.

Greedy identity is checked against llama.cpp's plain greedy decoding of the same target GGUF (one
token per forward through ``LlamaCppRunner``), margin-aware: a batched and a one-token evaluation
differ by ~1e-5 in the logits, so the outputs may part only where the reference's top-2 margin is
below ``NEAR_TIE`` (a random tiny model has few such positions; the test asserts it compared most
tokens, so it cannot pass by skipping).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from csdrafting import Cascade, CascadeConfig, ConfigError, ModelLoadError
from csdrafting.cli import main
from csdrafting.paths import DEFAULT_PROMPTS_FILE, MODELS_DIR
from tiny import FULL_TREES, KERNEL, broken_reviewer, chisquare_pvalue, noisy_copy, tiny_llama

HAS_LLAMA = all(importlib.util.find_spec(name) is not None for name in ("llama_cpp", "gguf"))
pytestmark = pytest.mark.skipif(
    not HAS_LLAMA, reason="llama-cpp-python / gguf not installed: pip install -e '.[llama]'"
)

PROMPTS = [[5, 17, 33, 2, 81, 40, 7], [1, 2, 3, 1, 2, 3, 1, 2], [60, 61, 9]]
NUM_NEW = 32
NEAR_TIE = 1e-3  # top-2 logit margin below which batched-vs-single rounding may flip an argmax


@pytest.fixture(autouse=True)
def cache_home(tmp_path_factory, monkeypatch):
    """Every test converts into one private cache (shared by the module: conversions are reused)."""
    home = tmp_path_factory.getbasetemp() / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home / "csdrafting" / "gguf"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """HF folders of a tiny target, a noisy copy (agrees often), a random model (rarely agrees)."""
    root = tmp_path_factory.mktemp("family")
    target = tiny_llama(0, vocab_size=96, hidden_size=64)
    models = {"target": target, "noisy": noisy_copy(target, 1, 0.02), "random": tiny_llama(99, hidden_size=64)}
    folders = {}
    for name, model in models.items():
        folders[name] = root / name
        model.save_pretrained(folders[name])
    folders["torch_target"] = target
    return folders


@pytest.fixture(scope="module")
def ggufs(family, tmp_path_factory):
    from csdrafting.convert import convert

    root = tmp_path_factory.mktemp("gguf")
    paths = {"target": convert(family["target"], root / "target.gguf", "f32").path}
    for name in ("noisy", "random"):
        paths[name] = convert(family[name], root / f"{name}.gguf", "q8_0").path
    return paths


def llama_plain_greedy(gguf_path, prompt: list[int], num_new: int) -> tuple[list[int], list[float]]:
    """llama.cpp's plain greedy decoding of a GGUF file and each step's top-2 margin."""
    from csdrafting.levels.llamacpp import LlamaCppRunner, greedy_with_margins

    runner = LlamaCppRunner(gguf_path)
    try:
        return greedy_with_margins(runner, prompt, num_new)
    finally:
        runner.close()


def torch_plain_greedy(model, prompt: list[int], num_new: int) -> tuple[list[int], list[float]]:
    """transformers' greedy decoding (float64) and each step's top-2 margin."""
    ids, margins = list(prompt), []
    with torch.no_grad():
        for _ in range(num_new):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]))
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :], margins


def assert_identical_up_to_near_ties(output: list[int], reference: tuple[list[int], list[float]]) -> int:
    """Equal to the reference, or parting first at a near-tie; returns the tokens compared."""
    ids, margins = reference
    for i, (got, expected) in enumerate(zip(output, ids)):
        if got != expected:
            assert margins[i] < NEAR_TIE, f"outputs part at {i} where the margin is {margins[i]:.2e}"
            return i
    assert len(output) == len(ids)
    return len(ids)


def run_cascade(config: CascadeConfig, params=None) -> list:
    cascade = Cascade.from_config(config, params=params)
    return [cascade.generate(prompt, NUM_NEW, ignore_eos=True) for prompt in PROMPTS]


# -- loading and the conversion cache -----------------------------------------------------------


def test_gguf_paths_load_with_llama_cpp_whatever_the_backend(ggufs):
    config = CascadeConfig(kernel=KERNEL, target=str(ggufs["target"]), drafters=(str(ggufs["noisy"]),), backend="torch")
    cascade = Cascade.from_config(config)
    described = cascade.describe()
    assert described["runner"] == "llama.cpp"
    assert described["level_runners"] == {"target.gguf": "llama.cpp", "noisy.gguf": "llama.cpp"}
    assert cascade.levels.sources == (str(ggufs["target"]), str(ggufs["noisy"]))
    again = Cascade.from_pretrained(ggufs["target"], [ggufs["noisy"]], backend="llama.cpp", drafter_outtype="f16")
    assert again.levels.loaded_with.drafter_outtype == "f16"  # no folder to convert: the files load as they are
    assert again.describe()["level_runners"] == described["level_runners"]


def test_hf_folders_convert_once_into_the_cache(family, cache_home, monkeypatch):
    import csdrafting.convert

    calls = []
    real_convert = csdrafting.convert.convert

    def counting_convert(folder, output, outtype):
        calls.append((Path(folder).name, outtype))
        return real_convert(folder, output, outtype)

    monkeypatch.setattr(csdrafting.convert, "convert", counting_convert)
    shutil.rmtree(cache_home, ignore_errors=True)
    config = CascadeConfig(
        kernel=KERNEL, target=str(family["target"]), drafters=(str(family["noisy"]),), backend="llama.cpp"
    )
    first = Cascade.from_config(config)
    # the target keeps the precision it runs in (float32), the drafter gets the default q8_0
    assert sorted(calls) == [("noisy", "q8_0"), ("target", "f32")]
    assert first.describe()["level_runners"] == {"target": "llama.cpp", "noisy": "llama.cpp"}
    files = sorted(p.name for p in cache_home.iterdir())
    assert len(files) == 2 and all(name.endswith(".gguf") for name in files)  # no temporary left
    Cascade.from_config(config)
    assert len(calls) == 2  # the second load converts nothing
    Cascade.from_config(
        CascadeConfig(kernel=KERNEL, target=str(family["target"]), backend="llama.cpp", drafter_outtype="f16")
    )
    assert len(calls) == 2  # the target's outtype does not follow drafter_outtype
    Cascade.from_config(
        CascadeConfig(
            kernel=KERNEL,
            target=str(family["target"]),
            drafters=(str(family["noisy"]),),
            backend="llama.cpp",
            drafter_outtype="f16",
        )
    )
    assert calls[-1] == ("noisy", "f16") and len(calls) == 3  # another outtype is another file


def test_cache_key_follows_the_folder_content(family, tmp_path, cache_home):
    from csdrafting.gguf_cache import cached_gguf

    folder = tmp_path / "copy"
    shutil.copytree(family["random"], folder)
    first = cached_gguf(folder, "f32")
    assert cached_gguf(folder, "f32") == first
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5  # the same size files with other content: another key
    (folder / "config.json").write_text(json.dumps(config))
    second = cached_gguf(folder, "f32")
    assert second != first and second.is_file() and first.is_file()


def test_a_failed_conversion_leaves_no_file_in_the_cache(family, cache_home, monkeypatch):
    import csdrafting.convert
    from csdrafting.gguf_cache import cached_gguf

    def dying_convert(folder, output, outtype):
        Path(output).write_bytes(b"GGUF half a file")
        raise KeyboardInterrupt  # a process killed mid-write

    monkeypatch.setattr(csdrafting.convert, "convert", dying_convert)
    shutil.rmtree(cache_home, ignore_errors=True)
    with pytest.raises(KeyboardInterrupt):
        cached_gguf(family["random"], "bf16")
    assert list(cache_home.iterdir()) == []


# -- the tokenizer over a GGUF's vocabulary -----------------------------------------------------
# (pycode_gguf: gguf_fixtures.py)


def test_gguf_tokenizer_round_trips_like_the_hf_tokenizer(pycode_gguf):
    from transformers import AutoTokenizer

    from csdrafting.gguf_tokenizer import LlamaCppTokenizer

    hf = AutoTokenizer.from_pretrained(MODELS_DIR / "pycode-1m")
    adapter = LlamaCppTokenizer(pycode_gguf)
    texts = [json.loads(line)["text"] for line in DEFAULT_PROMPTS_FILE.read_text().splitlines()]
    assert len(texts) >= 10
    for text in texts + ["naïve café 日本語 🙂", "a<|endoftext|>b", " " * 40 + "x"]:
        ids = adapter(text)["input_ids"]
        assert ids == hf(text)["input_ids"], text[:60]
        assert adapter.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
        assert adapter.decode(ids) == hf.decode(ids)
    assert adapter.decode([0], skip_special_tokens=True) == "" and adapter.decode([0]) == "<|endoftext|>"
    assert adapter.eos_token_id == hf.eos_token_id == 0 and adapter.eos_token_ids == {0}
    assert len(adapter) == hf.vocab_size and adapter.get_vocab() == hf.get_vocab()


def test_text_in_and_out_for_a_gguf_only_family(pycode_gguf):
    cascade = Cascade.from_config(CascadeConfig(kernel=KERNEL, target=str(pycode_gguf)))
    assert type(cascade.tokenizer).__name__ == "LlamaCppTokenizer"
    assert cascade.eos_token_ids == frozenset({0})
    result = cascade.generate("def add(a, b):\n", 12, ignore_eos=True)
    assert result.text == cascade.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert len(result.token_ids) == 12 and result.text
    streamed = "".join(chunk.text for chunk in cascade.stream("def add(a, b):\n", 12, ignore_eos=True))
    assert streamed == result.text


def test_a_converted_folder_keeps_its_hf_tokenizer(tmp_path):
    cascade = Cascade.from_config(
        CascadeConfig(kernel=KERNEL, target=str(MODELS_DIR / "pycode-1m"), backend="llama.cpp")
    )
    assert type(cascade.tokenizer).__name__ != "LlamaCppTokenizer"
    assert cascade.describe()["runner"] == "llama.cpp"
    assert cascade.generate("import os\n", 8, ignore_eos=True).text


# -- losslessness on llama.cpp levels -----------------------------------------------------------

CASCADES = [  # (drafters, k_matrix, lenience); MaG is on in each
    ((), [[4]], 1.0),
    (("noisy",), [[3, 2], [0, 2]], 1.0),
    (("noisy", "random"), [[2, 1, 2], [0, 2, 2], [0, 0, 2]], 1.0),
    (("noisy", "random"), [[2, 1, 2], [0, 2, 2], [0, 0, 2]], 2.0),
    (("random", "noisy"), "auto", 2.0),
]


@pytest.mark.parametrize(("drafters", "k_matrix", "lenience"), CASCADES)
def test_cascades_equal_llama_cpp_plain_greedy(ggufs, drafters, k_matrix, lenience):
    config = CascadeConfig(
        kernel=KERNEL,
        target=str(ggufs["target"]),
        drafters=tuple(str(ggufs[name]) for name in drafters),
        k_matrix=k_matrix,
        lenience=lenience,
    )
    compared = 0
    num_drafted = num_accepted = 0
    for prompt, result in zip(PROMPTS, run_cascade(config)):
        compared += assert_identical_up_to_near_ties(
            result.token_ids, llama_plain_greedy(ggufs["target"], prompt, NUM_NEW)
        )
        review = result.stats.levels[0].review
        num_drafted += review.num_drafted
        num_accepted += review.num_accepted
    assert compared >= 0.8 * NUM_NEW * len(PROMPTS)  # near-ties are rare: most tokens were compared
    assert 0 < num_accepted < num_drafted  # drafts were made, some accepted, some rejected


def test_mixed_backends_torch_target_and_llama_cpp_drafters(family, ggufs):
    config = CascadeConfig(
        kernel=KERNEL,
        target=str(family["target"]),
        drafters=(str(ggufs["noisy"]), str(ggufs["random"])),
        k_matrix=[[2, 1, 2], [0, 2, 2], [0, 0, 2]],
    )
    cascade = Cascade.from_config(config)
    assert cascade.describe()["level_runners"] == {
        "target": "lean",
        "noisy.gguf": "llama.cpp",
        "random.gguf": "llama.cpp",
    }
    compared = 0
    for prompt in PROMPTS:
        result = cascade.generate(prompt, NUM_NEW, ignore_eos=True)
        compared += assert_identical_up_to_near_ties(
            result.token_ids, torch_plain_greedy(family["torch_target"], prompt, NUM_NEW)
        )
        assert result.stats.levels[1].num_emitted > 0  # the llama.cpp drafter's tokens were accepted
    assert compared >= 0.8 * NUM_NEW * len(PROMPTS)


def test_mixed_backends_llama_cpp_target_and_torch_drafters(family, ggufs):
    config = CascadeConfig(
        kernel=KERNEL, target=str(ggufs["target"]), drafters=(str(family["noisy"]),), k_matrix=[[3, 2], [0, 2]]
    )
    cascade = Cascade.from_config(config)
    assert cascade.describe()["level_runners"] == {"target.gguf": "llama.cpp", "noisy": "lean"}
    compared = 0
    for prompt in PROMPTS:
        result = cascade.generate(prompt, NUM_NEW, ignore_eos=True)
        compared += assert_identical_up_to_near_ties(
            result.token_ids, llama_plain_greedy(ggufs["target"], prompt, NUM_NEW)
        )
        assert result.stats.levels[1].num_emitted > 0
    assert compared >= 0.8 * NUM_NEW * len(PROMPTS)


def test_the_identity_check_rejects_a_broken_verifier(ggufs, monkeypatch):
    """Mutant kept in the suite: a greedy review that accepts every draft must fail the check."""
    from csdrafting import verify

    def accept_all(reviewer_logits, draft_ids, lenience=1.0):
        return verify.ReviewOutcome(len(draft_ids), int(reviewer_logits[len(draft_ids)].argmax()))

    monkeypatch.setattr(verify, "review_greedy", accept_all)
    config = CascadeConfig(
        kernel=KERNEL, target=str(ggufs["target"]), drafters=(str(ggufs["random"]),), k_matrix=[[3, 1], [0, 1]]
    )
    with pytest.raises(AssertionError, match="outputs part at"):
        for prompt, result in zip(PROMPTS, run_cascade(config)):
            assert_identical_up_to_near_ties(result.token_ids, llama_plain_greedy(ggufs["target"], prompt, NUM_NEW))


# -- sampling through verify.py on llama.cpp levels --------------------------------------------

SAMPLING = {"temperature": 1.0, "top_k": 4}  # at most 4 x 4 outcomes over two tokens
NUM_SAMPLES = 3000


def exact_two_token_law(gguf_path, prompt: list[int]) -> dict[tuple[int, int], float]:
    """The target's warped law of two tokens after ``prompt``, from one-token llama.cpp forwards."""
    from csdrafting.levels.llamacpp import LlamaCppRunner
    from csdrafting.sampling import SamplingParams, warp

    params = SamplingParams(**SAMPLING)
    runner = LlamaCppRunner(gguf_path)
    first = warp(runner.forward(prompt, 0, 1), params)[0]
    law = {}
    for a in first.nonzero().flatten().tolist():
        second = warp(runner.forward([a], len(prompt), 1), params)[0]
        for b in second.nonzero().flatten().tolist():
            law[(a, b)] = float(first[a] * second[b])
    runner.close()
    return law


def sample_two_tokens(cascade, prompt: list[int]) -> tuple[dict, int]:
    counts: dict[tuple[int, int], int] = {}
    num_drafted = 0
    for seed in range(NUM_SAMPLES):
        result = cascade.generate(prompt, 2, seed=seed, ignore_eos=True, **SAMPLING)
        key = tuple(result.token_ids)
        counts[key] = counts.get(key, 0) + 1
        num_drafted += result.stats.levels[0].review.num_drafted
    return counts, num_drafted


@pytest.fixture(scope="module")
def sampling_cascade(ggufs):
    # the noisy drafter (q8_0) overlaps the target's law: accept rules and residuals both matter
    config = CascadeConfig(
        kernel=KERNEL, target=str(ggufs["target"]), drafters=(str(ggufs["noisy"]),), k_matrix=[[2, 1], [0, 1]]
    )
    return Cascade.from_config(config), exact_two_token_law(ggufs["target"], PROMPTS[0])


def test_sampled_cascade_has_the_target_distribution(sampling_cascade):
    cascade, law = sampling_cascade
    counts, num_drafted = sample_two_tokens(cascade, PROMPTS[0])
    assert num_drafted >= NUM_SAMPLES  # every generation reviewed a draft
    assert chisquare_pvalue(counts, law) > 1e-3


def test_sampling_check_rejects_a_broken_reviewer(sampling_cascade, monkeypatch):
    """Mutant kept in the suite: accepting a draft token with probability p(x), ignoring q(x)."""
    from csdrafting import verify

    monkeypatch.setattr(verify, "review_sampled", broken_reviewer(accept_rule="p_only"))
    cascade, law = sampling_cascade
    counts, _ = sample_two_tokens(cascade, PROMPTS[0])
    assert chisquare_pvalue(counts, law) < 1e-8


# -- token trees on llama.cpp levels (one sequence id per leaf) ------------------------------------

TREE_TOKENS = [11, 12, 13, 14, 21, 22, 31, 32]  # a root with two children, branches under node 1
TREE_PARENTS = [-1, 0, 1, 2, -1, 4, 1, 6]


def _tree_path_ids(node: int) -> list[int]:
    path = [node]
    while TREE_PARENTS[path[-1]] >= 0:
        path.append(TREE_PARENTS[path[-1]])
    return [TREE_TOKENS[n] for n in reversed(path)]


@pytest.mark.parametrize("path", [[0, 1, 2, 3], [4, 5], [0, 1, 6, 7], [0], []])
@pytest.mark.parametrize("max_leaves", [None, 1])
def test_llama_cpp_tree_logits_and_kept_path_equal_fresh_forwards(ggufs, path, max_leaves):
    """One batch over the tree (or, past the runner's sequences, one forward per path) gives every
    node the logits of its path alone; after commit_path the cache continues the kept path."""
    from csdrafting.backends import llama_level

    def fresh(ids):
        return llama_level("fresh", ggufs["target"]).next_token_logits(ids, 1)[0]

    level = llama_level("t", ggufs["target"])
    if max_leaves is not None:
        level.runner.max_tree_leaves = max_leaves  # too many leaves: the per-path fallback
    prompt = PROMPTS[0]
    level.prefill(prompt[:-1])
    context = prompt + [7, 8]  # catch-up before the tree
    logits = level.tree_logits(context, TREE_TOKENS, TREE_PARENTS)
    torch.testing.assert_close(logits[0], fresh(context), rtol=0, atol=1e-4)
    for node in range(len(TREE_TOKENS)):
        torch.testing.assert_close(logits[node + 1], fresh(context + _tree_path_ids(node)), rtol=0, atol=1e-4)
    level.commit_path(path)
    committed = context + [TREE_TOKENS[n] for n in path]
    after = level.next_token_logits(committed + [50], 1)[0]
    torch.testing.assert_close(after, fresh(committed + [50]), rtol=0, atol=1e-4)
    if max_leaves is None:  # the path's entries were kept: only the new token ran
        assert level.counters.num_tokens_run == len(prompt) - 1 + 3 + len(TREE_TOKENS) + 1
        assert level.runner.length == len(committed) + 1


@pytest.mark.parametrize(("drafters", "k_matrix"), [((), [[4]]), (("noisy",), [[2, 4], [0, 3]])])
def test_trees_on_llama_cpp_equal_plain_greedy(ggufs, drafters, k_matrix):
    config = CascadeConfig(
        kernel=KERNEL,
        target=str(ggufs["target"]),
        drafters=tuple(str(ggufs[name]) for name in drafters),
        k_matrix=k_matrix,
        tree=True,
        tree_budget=12,
    )
    compared = branched = 0
    for prompt, result in zip(PROMPTS, run_cascade(config, FULL_TREES)):  # every candidate in every tree
        compared += assert_identical_up_to_near_ties(
            result.token_ids, llama_plain_greedy(ggufs["target"], prompt, NUM_NEW)
        )
        tree = result.stats.levels[0].tree
        branched += tree.num_nodes - tree.num_chain_nodes
    assert compared >= 0.8 * NUM_NEW * len(PROMPTS)
    assert branched > 0  # alternatives were verified in the one-batch tree forward


# -- bad input ----------------------------------------------------------------------------------


def test_config_validates_backend_and_drafter_outtype():
    assert CascadeConfig(backend="llama.cpp", drafter_outtype="q8_0").drafter_outtype == "q8_0"
    with pytest.raises(ConfigError, match="backend must be one of torch, llama.cpp"):
        CascadeConfig(backend="ggml")
    with pytest.raises(ConfigError, match="drafter_outtype must be one of f32, f16, bf16, q8_0, got 'q4_k'"):
        CascadeConfig(drafter_outtype="q4_k")


def one_error_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # drop what building the models printed
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_bad_input_is_one_error_line(family, ggufs, tmp_path, capsys, monkeypatch):
    gen = ["generate", "--prompt-file", str(tmp_path / "p.txt"), "--max-new-tokens", "2"]
    (tmp_path / "p.txt").write_text("x")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(ggufs["target"].read_bytes()[: ggufs["target"].stat().st_size // 2])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    for path in (truncated, garbage):
        assert "llama.cpp cannot load" in one_error_line(capsys, [*gen, "--target", str(path)])
    assert "GGUF file not found" in one_error_line(capsys, [*gen, "--target", str(tmp_path / "no.gguf")])
    err = one_error_line(capsys, [*gen, "--target", str(family["target"]), "--drafter-outtype", "q4"])
    assert "drafter_outtype must be one of" in err
    assert "backend must be one of" in one_error_line(capsys, [*gen, "--backend", "ggml"])
    # a drafter whose vocabulary differs from the target's (mixed backends)
    other = tmp_path / "other"
    tiny_llama(3, vocab_size=128, hidden_size=64).save_pretrained(other)
    err = one_error_line(capsys, [*gen, "--target", str(ggufs["target"]), "--drafter", str(other)])
    assert "vocabulary of 128 tokens, the target 96" in err
    # converting an unsupported architecture
    odd = tmp_path / "odd"
    shutil.copytree(family["random"], odd)
    config = json.loads((odd / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (odd / "config.json").write_text(json.dumps(config))
    err = one_error_line(capsys, [*gen, "--target", str(odd), "--backend", "llama.cpp"])
    assert "only plain Llama models convert" in err
    # the extra missing
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    err = one_error_line(capsys, [*gen, "--target", str(family["target"]), "--backend", "llama.cpp"])
    assert "pip install -e '.[llama]'" in err
    assert "pip install -e '.[llama]'" in one_error_line(capsys, [*gen, "--target", str(ggufs["target"])])


def test_cli_generate_on_llama_cpp(capsys, tmp_path):
    """The real command path: a converted folder as target, a config file naming the backend."""
    config = tmp_path / "csd.json"
    config.write_text(
        json.dumps({"target": str(MODELS_DIR / "pycode-1m"), "backend": "llama.cpp", "drafter_outtype": "f16"})
    )
    argv = ["generate", "--config", str(config), "--prompt", "import os\n", "--max-new-tokens", "6", "--json"]
    assert main([*argv, "--threads", "1"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["config"]["level_runners"] == {"pycode-1m": "llama.cpp"} and len(payload["token_ids"]) == 6
    assert main([*argv, "--backend", "torch"]) == 0  # the flag overrides the file
    assert json.loads(capsys.readouterr().out)["config"]["runner"] != "llama.cpp"


def test_vocabulary_text_mismatch_between_backends(pycode_gguf, tmp_path):
    """Same vocabulary size, other token texts: a mixed cascade refuses to load."""
    folder = tmp_path / "pycode-1m-renamed"
    shutil.copytree(MODELS_DIR / "pycode-1m", folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ModelLoadError, match="different tokenizer"):
        Cascade.from_config(CascadeConfig(kernel=KERNEL, target=str(pycode_gguf), drafters=(str(folder),)))


def test_llama_cpp_levels_need_the_cpu(ggufs):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to be refused on")
    with pytest.raises(ConfigError, match="llama.cpp levels run on the CPU"):
        Cascade.from_config(CascadeConfig(kernel=KERNEL, target=str(ggufs["target"]), device="cuda"))
