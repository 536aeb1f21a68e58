"""``csd bench``: run a benchmark suite; ``csd bench report``: tables and plots; ``csd bench profile``:
the runner's per-forward overhead. Registered by ``csdrafting.cli`` through ``add_parser``."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from ..errors import ConfigError

EXAMPLES = """\
examples:
  csd bench                                  the default suite at 128 new tokens (meant to take < 15 min on 2 cores)
  csd bench --suite ablation                 remove each cascade; sweep K[0][0]
  csd bench --suite length                   tokens/s at 32, 64, 128 and 256 new tokens
  csd bench --num-prompts 2 --lengths 32     a quick look
  csd bench --method 'csd-k3={"k_matrix": [[3,1,4],[0,1,3],[0,0,3]]}' --only 'hf-plain,csd-*'
  csd bench report runs/bench-*.jsonl --out runs/report
  csd bench profile --tokens 1,4,8
  csd bench --suite llama                    llama.cpp peers and our methods on llama.cpp levels (the llama extra)
  csd bench --backends llama.cpp --only 'llama-*,csd-full*'
  csd bench profile --backends torch,llama.cpp
"""


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def add_parser(subparsers) -> None:
    from ..cli import add_cascade_arguments, add_cascade_command

    bench = add_cascade_command(
        subparsers,
        "bench",
        help="benchmark against transformers' generate, assisted generation and prompt lookup",
        description="Run every method of a suite on the same prompts, interleaved, in one process; "
        "write one JSON line per (prompt, method, mode, length, trial). "
        "Subcommands: `report` turns results into a markdown table and plots, `profile` measures "
        "the runner's per-forward overhead.",
        examples=EXAMPLES,
    )
    _add_run_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    sub = bench.add_subparsers(dest="bench_command", metavar="{report,profile}")
    report = sub.add_parser("report", help="markdown table and PNG plots from result files")
    report.add_argument("results", nargs="+", help="JSONL files written by `csd bench`")
    report.add_argument("--out", required=True, help="folder for report.md and the plots")
    report.add_argument("--title", default="csd bench results", help="report title")
    report.set_defaults(func=cmd_report)

    profile = sub.add_parser("profile", help="per-forward overhead of the runner beside raw model forwards")
    add_cascade_arguments(profile)
    profile.add_argument("--prompts", default=None, help="prompts JSONL (default: benchmarks/prompts.jsonl)")
    profile.add_argument("--prompt-index", type=int, default=0, help="which prompt to use (default: 0)")
    profile.add_argument(
        "--tokens", type=_csv(int), default=[1, 4, 8], help="new tokens per forward to time (default: 1,4,8)"
    )
    profile.add_argument("--repeats", type=int, default=30, help="timed forwards per measurement (default: 30)")
    profile.add_argument("--max-new-tokens", type=int, default=128, help="tokens per profiled generation")
    profile.add_argument("--suite-file", help="suite file (default: benchmarks/suite.json)")
    profile.add_argument("--suite", default="default", help="suite whose csd methods are profiled in generation")
    profile.add_argument("--only", type=_csv(str), default=None, help="glob patterns of methods to profile")
    profile.add_argument("--out", default=None, help="folder for profile.md and profile.json")
    _add_backend_arguments(profile, profile)
    profile.set_defaults(func=cmd_profile)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_prompt_arguments

    group = parser.add_argument_group("benchmark")
    add_prompt_arguments(group)
    group.add_argument("--suite-file", help="suite file replacing benchmarks/suite.json")
    group.add_argument("--suite", default="default", help="suite to run: default, ablation, length, smoke, ...")
    group.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='add or replace a method, e.g. csd-x=\'{"k_matrix": "3,1,4;1,3;3"}\' (engine csd by default); repeatable',
    )
    group.add_argument("--only", type=_csv(str), default=None, help="run only methods matching these glob patterns")
    group.add_argument(
        "--modes",
        type=_csv(str),
        default=None,
        help="comma-separated: greedy-fixed, greedy-natural, sampling-fixed, sampling-natural (default: the suite's)",
    )
    group.add_argument(
        "--lengths",
        type=_csv(int),
        default=None,
        help="new tokens per generation, e.g. 32,64,128 (default: the suite's)",
    )
    group.add_argument("--trials", type=int, default=1, help="timed repetitions of every generation (default: 1)")
    group.add_argument("--warmup", type=int, default=1, help="untimed generations per method and decoding (default: 1)")
    group.add_argument("--seed", type=int, default=0, help="base seed; sampling uses seed + 1000*trial + prompt index")
    group.add_argument("--temperature", type=float, default=0.7, help="sampling modes (default: 0.7)")
    group.add_argument("--top-p", type=float, default=0.95, help="sampling modes (default: 0.95)")
    group.add_argument("--top-k", type=int, default=None, help="sampling modes (default: off)")
    group.add_argument("--output", "-o", help="results JSONL (default: runs/bench-SUITE-TIME.jsonl)")
    group.add_argument("--report", metavar="DIR", help="also write the report to DIR when the run ends")
    group.add_argument("--save-tokens", action="store_true", help="record every row's token ids")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_backend_arguments(parser, group)


def _add_backend_arguments(parser: argparse.ArgumentParser, group) -> None:
    group.add_argument(
        "--backends",
        type=_csv(str),
        default=None,
        help="where our methods run, comma-separated: torch, llama.cpp (default: the suite's; llama.cpp is "
        "left out when llama-cpp-python is not installed). Peers run when their library's backend is listed",
    )
    group.add_argument("--gguf-dir", default=None, help="cache of converted GGUFs (default: ~/.cache/csdrafting/gguf)")
    # the cascade flags may define it (the loader's drafter output type): add it only where they do not
    if "--drafter-outtype" not in parser._option_string_actions:
        group.add_argument(
            "--drafter-outtype",
            default=None,
            choices=("f32", "f16", "bf16", "q8_0"),
            help="GGUF type of llama.cpp drafters (default: q8_0); the target stays f32",
        )


def _backends(args, suite_backends: list[str] | None, target: str) -> list[str]:
    """The backends to run: --backends, else --backend when the cascade flags have it, else the
    suite's, without llama.cpp when its library is missing (an explicit request for it errs).
    A GGUF target runs on llama.cpp only: it has no transformers model."""
    from ..backends import is_gguf
    from .llamacpp_peers import check_backends, llama_extra_available

    explicit = args.backends or ([args.backend] if getattr(args, "backend", None) else None)
    if is_gguf(target):
        if args.backends and "torch" in args.backends:
            raise ConfigError(f"{target} is a GGUF file: its methods run on llama.cpp only (--backends llama.cpp)")
        return check_backends(["llama.cpp"])
    if explicit:
        return check_backends(explicit)
    backends = list(suite_backends or ["torch"])
    if "llama.cpp" in backends and not llama_extra_available():
        print("csd bench: llama-cpp-python is not installed, skipping the llama.cpp methods")
        backends.remove("llama.cpp")
    return check_backends(backends or ["torch"])


def _family(args) -> tuple[object, str, list[str], tuple[str, dict] | None]:
    """(cascade config, target, drafters to load, extra method) from the cascade flags.

    The models come from --target / --drafter, else from the --config file, else the embedded
    family; the --config file's drafters are loaded too, and with the embedded target so are the
    embedded drafters (the default suite then runs beside a --config that uses only some of them).
    A --config file or any of --k-matrix / --lenience / --no-mag / --adaptive / --mag-first /
    --drafter-window adds that cascade as the method ``csd-config`` (its drafters: the file's,
    else the loaded ones).
    """
    from ..cli import DEFAULT_DRAFTERS, DEFAULT_TARGET, config_from_args
    from ..config import CascadeConfig

    config = config_from_args(args, model_flags=not args.config)
    from_file = CascadeConfig.load(args.config) if args.config else None
    target = str(args.target or config.target)
    if args.target is not None or args.drafter is not None:
        drafters = [str(d) for d in args.drafter or []]
    else:
        drafters = [str(d) for d in config.drafters]
    if from_file is not None:
        drafters += [str(d) for d in from_file.drafters]
    if args.drafter is None and Path(target).resolve() == DEFAULT_TARGET.resolve():
        drafters = [str(p) for p in DEFAULT_DRAFTERS] + drafters
    unique: dict[str, str] = {}
    for path in drafters:  # first occurrence of each folder name wins, order kept
        unique.setdefault(Path(path).name, path)
    drafters = list(unique.values())
    shaped = any(
        getattr(args, name, None) is not None
        for name in ("config", "k_matrix", "lenience", "no_mag", "adaptive", "mag_first", "drafter_window")
    )
    extra = None
    if shaped:
        method_drafters = from_file.drafters if from_file is not None and from_file.drafters else config.drafters
        extra = (
            "csd-config",
            {
                "engine": "csd",
                "drafters": [Path(d).name for d in method_drafters],
                "mag": config.mag,
                "k_matrix": config.k_matrix,
                "lenience": config.lenience,
                "adaptive": config.adaptive,
                "mag_first": config.mag_first,
                "drafter_window": config.drafter_window,
                "description": "from --config / cascade flags",
            },
        )
    return config, target, drafters, extra


def _model_fields(args, cascade_config, target: str, drafters: list[str]) -> dict:
    """The fields ``BenchConfig`` and ``ProfileConfig`` share: which models load, and how."""
    return {
        "target": target,
        "drafters": drafters,
        "device": cascade_config.device,
        "dtype": cascade_config.dtype,
        "bigram": cascade_config.bigram,
        "runner": args.runner or "auto",
        "kernel": cascade_config.kernel,
        "drafter_outtype": args.drafter_outtype or "q8_0",
        "gguf_dir": Path(args.gguf_dir) if args.gguf_dir else None,
    }


def cmd_bench(args) -> int:
    from ..prompts import DEFAULT_PROMPTS_FILE, load_prompts
    from .runner import BenchConfig, run_benchmark
    from .suite import build_suite, load_suite_file, parse_method_flag

    if args.trials < 1 or args.warmup < 0:
        raise ConfigError("--trials must be >= 1 and --warmup >= 0")
    cascade_config, target, drafters, flagged = _family(args)
    extra = [parse_method_flag(text) for text in args.method]
    if flagged is not None:
        extra.append(flagged)
    data = load_suite_file(args.suite_file)
    suite = build_suite(
        data,
        args.suite,
        [Path(d).name for d in drafters],
        extra_methods=extra,
        only=args.only,
        modes=args.modes,
        lengths=args.lengths,
        backends=_backends(args, data["suites"].get(args.suite, {}).get("backends"), target),
    )
    suite = _without_missing_server(suite)
    prompts_file = args.prompts or suite.prompts or str(DEFAULT_PROMPTS_FILE)
    prompts = load_prompts(prompts_file, args.num_prompts)
    if args.output:
        output = Path(args.output)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        output = Path("runs") / f"bench-{suite.name}-{stamp}.jsonl"
    config = BenchConfig(
        **_model_fields(args, cascade_config, target, drafters),
        suite=suite,
        prompts=prompts,
        output=output,
        trials=args.trials,
        warmup=args.warmup,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        progress=not args.no_progress,
        save_tokens=args.save_tokens,
        prompts_file=prompts_file,
    )
    if args.temperature <= 0 and any(m.startswith("sampling") for m in suite.modes):
        raise ConfigError("--temperature must be > 0 for the sampling modes")
    path = run_benchmark(config)
    from .report import load_rows, summary_lines, write_report

    rows = load_rows([path])
    for line in summary_lines(rows):
        print(line)
    if args.report:
        written = write_report(rows, Path(args.report))
        print(f"report: {written}")
    return 0


def _without_missing_server(suite):
    """The suite without its llama-server peers when the binary is not built (a note says so)."""
    import dataclasses

    from .llama_server_peer import default_server_path, server_available

    if server_available() or not any(m.engine == "llama-server" for m in suite.methods):
        return suite
    print(
        f"csd bench: no llama-server at {default_server_path()}, skipping its methods "
        "(build it with scripts/build_llama_server.sh)"
    )
    return dataclasses.replace(suite, methods=tuple(m for m in suite.methods if m.engine != "llama-server"))


def cmd_report(args) -> int:
    from .report import load_rows, write_report

    rows = load_rows([Path(p) for p in args.results])
    path = write_report(rows, Path(args.out), title=args.title)
    print(f"wrote {path}")
    return 0


def cmd_profile(args) -> int:
    from .profile import ProfileConfig, run_profile

    cascade_config, target, drafters, flagged = _family(args)
    backends = _backends(args, ["torch"], target)
    config = ProfileConfig(
        **_model_fields(args, cascade_config, target, drafters),
        prompts_file=args.prompts,
        prompt_index=args.prompt_index,
        tokens=args.tokens,
        repeats=args.repeats,
        max_new_tokens=args.max_new_tokens,
        suite_file=args.suite_file,
        suite=args.suite,
        only=args.only,
        extra_methods=[flagged] if flagged is not None else [],
        out=Path(args.out) if args.out else None,
        backends=tuple(backends),
    )
    run_profile(config)
    return 0
