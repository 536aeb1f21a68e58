"""The ``csd`` command. ``main(argv) -> int`` runs in-process (the tests call it directly).

Each subcommand lives in a function ``cmd_<name>(args) -> int``; user errors (``CSDraftingError``)
become one ``error: ...`` line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, CSDraftingError
from .paths import MODELS_DIR  # the embedded default family, shipped as package data

DEFAULT_TARGET = MODELS_DIR / "pycode-22m"
DEFAULT_DRAFTERS = [MODELS_DIR / "pycode-5m", MODELS_DIR / "pycode-1m"]
# what `csd generate` runs with no model flags: the family's measured best cascade (docs/bench.md, Results)
DEFAULT_CONFIG = MODELS_DIR / "csd_default.json"


def _mag_first_arg(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a match length or 'auto', got {text!r}") from None


def add_cascade_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that choose and configure the cascade (shared by generate, bench, tune and serve).

    Precedence: a flag given on the command line, then the --config file, then the defaults.
    """
    group = parser.add_argument_group("cascade")
    group.add_argument("--config", help="cascade configuration file (JSON, e.g. written by `csd tune`)")
    group.add_argument("--target", help=f"target model folder (default: the embedded {DEFAULT_TARGET.name})")
    group.add_argument(
        "--drafter",
        action="append",
        default=None,
        metavar="PATH",
        help="drafter model folder, largest first; repeat for more (default with no --target: "
        + " + ".join(p.name for p in DEFAULT_DRAFTERS)
        + ")",
    )
    group.add_argument(
        "--no-mag", action="store_const", const=True, default=None, help="turn off the MaG statistical drafter"
    )
    group.add_argument(
        "--bigram", help="MaG bigram table (.npy from `csd build-bigram`; default: csd_bigram.npy in the target folder)"
    )
    group.add_argument(
        "--k-matrix",
        help='"auto" (default: a starting point adapted online), JSON "[[2,1,4],[0,1,3],[0,0,3]]" '
        'or upper-triangle shorthand "2,1,4;1,3;3" (used as given)',
    )
    group.add_argument(
        "--adaptive", choices=["on", "off"], default=None, help="adapt draft lengths online (default: on for auto)"
    )
    group.add_argument(
        "--mag-first",
        type=_mag_first_arg,
        default=None,
        metavar="N|auto",
        help="when MaG's proposal continues a suffix match of >= N tokens, send it to the target directly; "
        "auto: where its measured acceptance and the target's measured costs say it pays",
    )
    group.add_argument(
        "--lenience", type=float, default=None, help="how leniently drafters review smaller drafters (>= 1; default 1)"
    )
    group.add_argument(
        "--tree",
        action="store_true",
        default=None,
        help="the target may verify a token tree: the draft plus the candidates (drafters' second choices, "
        "MaG's alternatives and continuation) worth their measured cost (needs MaG)",
    )
    group.add_argument(
        "--tree-budget", type=int, default=None, metavar="N", help="at most N draft-tree nodes (implies --tree)"
    )
    add_loading_arguments(group)


def add_cascade_command(subparsers, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand that takes the cascade flags, with ``examples`` below its --help text."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_cascade_arguments(parser)
    return parser


def add_loading_arguments(group) -> None:
    """The cascade flags fixed when levels load: device, precision, threads, runner, kernel, backend."""
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    group.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or float64 (default: float32)")
    group.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core; on a machine busy with other work, "
        "fewer threads avoid stalls where one thread waits for a descheduled peer)",
    )
    group.add_argument("--runner", default=None, choices=["auto", "lean", "transformers"], help=argparse.SUPPRESS)
    group.add_argument(
        "--kernel",
        default=None,
        choices=["auto", "linear", "onednn", "transposed", "packed"],
        help="the lean runner's matmul kernel: auto (timed on this machine, cached; default, or "
        "$CSDRAFTING_KERNEL) or one for every matmul",
    )
    group.add_argument(
        "--backend",
        default=None,
        help="how model folders run: torch (default) or llama.cpp (converted to GGUF once and cached; "
        "needs the llama extra). A .gguf path always runs on llama.cpp",
    )
    group.add_argument(
        "--drafter-outtype",
        default=None,
        help="f32, f16, bf16 or q8_0: GGUF type drafter folders are converted to on llama.cpp (default: q8_0; the target keeps its precision)",
    )
    group.add_argument(
        "--drafter-window",
        type=int,
        default=None,
        metavar="N",
        help="drafters read only the last N prompt tokens (less drafter prefill; the output stays the target's)",
    )


def add_prompt_arguments(group) -> None:
    """--prompts / --num-prompts: the prompt set of ``csd bench`` and ``csd tune``."""
    group.add_argument(
        "--prompts", default=None, help="prompts JSONL with id and text (default: benchmarks/prompts.jsonl)"
    )
    group.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU thread count from --threads (before any model runs)."""
    if threads is None:
        return
    if isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def config_from_args(args, model_flags: bool = True):
    """The cascade configuration the flags (and --config file) describe. ``model_flags=False``
    leaves the file's (or the default's) target and drafters as they are: ``csd bench`` loads the
    flags' models beside them and runs the file's cascade as one method."""
    from dataclasses import replace

    from .config import CascadeConfig
    from .edge import config_defaults

    defaults = config_defaults()  # the environment's, below the file's and the flags'
    if getattr(args, "config", None):
        config = CascadeConfig.load(args.config, defaults)
    elif args.target is None and args.drafter is None and not args.no_mag and DEFAULT_CONFIG.is_file():
        config = CascadeConfig.load(DEFAULT_CONFIG, defaults)  # the embedded family, as tuned for it
    else:
        config = CascadeConfig(**defaults)
    changes = {}
    if model_flags and args.target is not None:
        changes["target"] = args.target
        changes["drafters"] = args.drafter or []
    elif model_flags and args.drafter is not None:
        changes["drafters"] = args.drafter
    if config.target is None and "target" not in changes:
        changes["target"] = str(DEFAULT_TARGET)
        if "drafters" not in changes and not config.drafters:
            changes["drafters"] = [str(p) for p in DEFAULT_DRAFTERS]
    if args.no_mag:
        changes["mag"] = False
    for name in (
        "bigram",
        "k_matrix",
        "lenience",
        "device",
        "dtype",
        "mag_first",
        "runner",
        "kernel",
        "backend",
        "drafter_outtype",
        "drafter_window",
    ):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.adaptive is not None:
        changes["adaptive"] = args.adaptive == "on"
    if getattr(args, "tree_budget", None) is not None:
        changes["tree"], changes["tree_budget"] = True, args.tree_budget
    elif getattr(args, "tree", None):
        changes["tree"] = True
    return replace(config, **changes)  # validated as a whole: a K-matrix must fit the levels


def cascade_from_args(args):
    from .cascade import Cascade

    return Cascade.from_config(config_from_args(args))


def _read_prompt(args) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise ConfigError("give either --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read prompt file {args.prompt_file}: {exc}") from None
    if args.prompt is None:
        raise ConfigError("no prompt: give --prompt TEXT or --prompt-file FILE")
    return args.prompt


def cmd_generate(args) -> int:
    prompt = _read_prompt(args)
    cascade = cascade_from_args(args)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        stop=args.stop,
    )
    if args.stream and not args.json:
        for chunk in cascade.stream(prompt, **options):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            if chunk.stats is not None:
                stats = chunk.stats
        sys.stdout.write("\n")
        print(_summary(stats), file=sys.stderr)
        return 0
    result = cascade.generate(prompt, **options)
    if args.json:
        payload = result.as_dict()
        payload["config"] = cascade.describe()
        print(json.dumps(payload))
    else:
        print(result.text)
        print(_summary(result.stats), file=sys.stderr)
    return 0


def _summary(stats) -> str:
    rate = stats.acceptance_rate
    accept = f", acceptance {rate:.2f}" if rate is not None else ""
    return (
        f"[{stats.num_new_tokens} tokens, {stats.tokens_per_second:.1f} tok/s, "
        f"{stats.tokens_per_target_step:.2f} tokens per target step{accept}, finish: {stats.finish_reason}]"
    )


def cmd_build_bigram(args) -> int:
    from .levels.mag import BigramTable
    from .loading import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    files: list[Path] = []
    for item in args.corpus:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob(f"*{args.suffix}") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"corpus path not found: {item}")
    if not files:
        raise ConfigError(f"no corpus files found (looked for *{args.suffix} under the given folders)")
    vocab_size = len(tokenizer)

    def sequences():
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # unreadable files are skipped, as a corpus often has a few
            if text:
                yield tokenizer(text)["input_ids"]

    table = BigramTable.from_token_ids(sequences(), vocab_size)
    table.save(args.output)
    known = int((table.next_token >= 0).sum())
    print(f"wrote {args.output}: {known} of {vocab_size} tokens have a successor, from {len(files)} files")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csd",
        description="Cascade Speculative Drafting: faster, lossless generation with the drafters you already have.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text with the cascade")
    add_cascade_arguments(gen)
    prompt = gen.add_argument_group("prompt and sampling")
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", help="read the prompt from this file")
    prompt.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default: 128)")
    prompt.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    prompt.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    prompt.add_argument("--top-p", type=float, default=None, help="sample from the top-p probability mass")
    prompt.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    prompt.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string; repeatable")
    prompt.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS (fixed-length runs)")
    prompt.add_argument("--stream", action="store_true", help="print text as it is accepted")
    prompt.add_argument("--json", action="store_true", help="print one JSON object: token_ids, text, stats, config")
    gen.set_defaults(func=cmd_generate)

    big = sub.add_parser("build-bigram", help="build MaG's bigram table from a text corpus")
    big.add_argument("--tokenizer", required=True, help="folder with the model's tokenizer")
    big.add_argument("--output", required=True, help="where to write the table (.npy)")
    big.add_argument("--suffix", default=".py", help="file suffix to collect from corpus folders (default: .py)")
    big.add_argument("corpus", nargs="+", help="corpus files or folders")
    big.set_defaults(func=cmd_build_bigram)

    add_convert_parser(sub)
    for module in _EXTENSIONS:
        module.add_parser(sub)
    return parser


def add_convert_parser(sub) -> None:
    """`csd convert`: a Hugging Face Llama folder to a GGUF file for the llama.cpp backend."""
    conv = sub.add_parser("convert", help="convert a Llama model folder to GGUF (needs the llama extra)")
    conv.add_argument("model", metavar="HF_FOLDER", help="Hugging Face model folder (Llama architecture)")
    conv.add_argument("-o", "--output", required=True, metavar="OUT.gguf", help="GGUF file to write")
    conv.add_argument(
        "--outtype", default="f32", help="weight type: f32 (default), f16, bf16 or q8_0 (drafters may be approximate)"
    )
    conv.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from .convert import convert

    result = convert(args.model, args.output, args.outtype)
    note = f", {len(result.fallback_tensors)} matrices kept in f16" if result.fallback_tensors else ""
    vocab = "with its tokenizer" if result.has_tokenizer else "without a tokenizer (token ids only)"
    print(
        f"wrote {result.path}: {result.num_tensors} tensors, {result.num_params:,} parameters, "
        f"{result.outtype}{note}, {vocab}"
    )
    return 0


def _load_extensions() -> list:
    """Subcommands defined in other modules (bench, tune, serve), registered when present."""
    import importlib

    found = []
    for name in ("csdrafting.bench.cli", "csdrafting.tune.cli", "csdrafting.server.cli", "csdrafting.families"):
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name is None or not name.startswith(exc.name):
                raise
    return found


_EXTENSIONS = _load_extensions()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        apply_threads(getattr(args, "threads", None))
        return args.func(args)
    except CSDraftingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
