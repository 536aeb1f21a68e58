#!/usr/bin/env python
"""Cut the three workload prompt sets (completion, edit, chat) from the running interpreter's standard library.

The Python standard library's own source files are PSF-licensed and ship with every Python, so the project may
ship excerpts of them. Two disjoint module lists give two sets: ``benchmarks/workloads/*.jsonl`` (the committed
set, which the project may tune on) and ``benchmarks/workloads/heldout/*.jsonl`` (prompts the project has not
seen, for the final measurement). Per module, per set:

* completion: an excerpt of whole lines (about 400 tokens) ending inside a function body; continue it for a
  fixed 128 tokens.
* edit: an instruct request to return one function (about 100-200 tokens) with a small change (rename a
  parameter, add a docstring line, change a default); most of the answer repeats the prompt.
* chat: an instruct question about one function, to be answered in prose (little of it repeats).

Everything is chosen by fixed rules (``ast``, sizes in characters, positions in sorted lists), so the sets depend
only on the standard library's exact text: each record carries the Python version it was cut from, and
``--check`` regenerates every file and compares.

    python scripts/make_workloads.py            # writes benchmarks/workloads/
    python scripts/make_workloads.py --check    # exit 1 if a committed file differs
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import sys
import sysconfig
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "workloads"

# Disjoint, sorted, fixed. Neither list overlaps scripts/make_prompts.py's modules.
COMMITTED_MODULES = [
    "ast", "base64", "csv", "dataclasses", "enum", "fnmatch",
    "functools", "gettext", "inspect", "ipaddress", "locale", "mimetypes",
]  # fmt: skip
HELDOUT_MODULES = [
    "pprint", "random", "shutil", "sched", "selectors", "smtplib",
    "string", "tarfile", "tempfile", "timeit", "tokenize", "zipfile",
]  # fmt: skip

# Sizes in characters; Python source runs at about 3.5-4.5 characters per Qwen2.5 token.
COMPLETION_MIN_CHARS, COMPLETION_MAX_CHARS = 1750, 2050  # ~400 tokens (measured: 4.4 characters a token)
EDIT_MIN_CHARS, EDIT_MAX_CHARS = 400, 750  # ~100-200 tokens
CHAT_MIN_CHARS, CHAT_MAX_CHARS = 400, 1200
COMPLETION_NEW_TOKENS = 128  # fixed-length: runs ignore EOS
INSTRUCT_MAX_NEW_TOKENS = 256  # edit and chat stop at the end-of-turn token, or here

CHAT_QUESTIONS = [
    "Explain in a few sentences what this function does and when a caller would use it.",
    "Which inputs does this function treat specially, and what happens in each case?",
    "Is there anything surprising or error-prone in this function? Explain briefly.",
    "Describe step by step, in plain words, how this function computes its result.",
]
EDIT_KINDS = ("rename", "docstring", "default")


def functions(tree: ast.Module, lines: list[str]) -> list[tuple[ast.FunctionDef, str]]:
    """Every (async) function and method with its dedented source (decorators included), in line order."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            found.append((node, textwrap.dedent("".join(lines[first - 1 : node.end_lineno]))))
    return sorted(found, key=lambda item: item[0].lineno)


def middle(candidates: list, what: str) -> object:
    if not candidates:
        raise SystemExit(f"no candidate for {what}: the standard library changed shape")
    return candidates[len(candidates) // 2]


# -- completion ----------------------------------------------------------------------------------


def completion_excerpt(lines: list[str], tree: ast.Module) -> tuple[str, int, int]:
    """(text, first line, last line): whole lines ending 40% into the body of the middle long function."""
    long_functions = [node for node, _ in functions(tree, lines) if node.end_lineno - node.lineno >= 15]
    node = middle(long_functions, "a completion cut")
    last = node.lineno + int(0.4 * (node.end_lineno - node.lineno))  # 1-based, inclusive
    while last > node.lineno and not lines[last - 1].strip():  # do not end on a blank line
        last -= 1
    first, total = last, len(lines[last - 1])
    while first > 1 and total < COMPLETION_MIN_CHARS and total + len(lines[first - 2]) <= COMPLETION_MAX_CHARS:
        first -= 1
        total += len(lines[first - 1])
    text = "".join(lines[first - 1 : last])
    if len(text) < COMPLETION_MIN_CHARS * 0.8:
        raise SystemExit(f"completion excerpt of {len(text)} characters is too short")
    return text, first, last


# -- edit -----------------------------------------------------------------------------------------


def _renamable(node: ast.FunctionDef) -> str | None:
    """A parameter (not self/cls) that the body uses at least twice, or None."""
    params = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    uses = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
    for name in params:
        if name not in ("self", "cls") and len(name) > 1 and uses.count(name) >= 2:
            return name
    return None


def _changeable_default(node: ast.FunctionDef) -> tuple[str, object, object] | None:
    """(parameter, old default, new default) for the first int or bool default, or None."""
    positional = node.args.posonlyargs + node.args.args
    pairs = list(zip(positional[len(positional) - len(node.args.defaults) :], node.args.defaults))
    pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
    for arg, default in pairs:
        if isinstance(default, ast.Constant) and isinstance(default.value, bool):
            return arg.arg, default.value, not default.value
        if isinstance(default, ast.Constant) and type(default.value) is int:
            return arg.arg, default.value, default.value * 2 if default.value else 1
    return None


def edit_instruction(kind: str, node: ast.FunctionDef) -> str | None:
    """The requested change of one kind for this function, or None when the function does not allow it."""
    if kind == "rename" and (name := _renamable(node)):
        return f"Rename the parameter `{name}` to `{name}_arg` everywhere in the function."
    if kind == "docstring" and ast.get_docstring(node) is None:
        return f"Add a one-line docstring to `{node.name}` that says what it does."
    if kind == "default" and (change := _changeable_default(node)):
        name, old, new = change
        return f"Change the default value of `{name}` from `{old!r}` to `{new!r}`."
    return None


def edit_prompt(code: str, instruction: str) -> str:
    return (
        f"Here is a Python function:\n\n```python\n{code}```\n\n{instruction} "
        "Reply with the whole changed function in one ```python block and nothing else."
    )


# -- chat -----------------------------------------------------------------------------------------


def chat_prompt(code: str, question: str) -> str:
    return f"```python\n{code}```\n\n{question} Answer in prose; do not rewrite the code."


# -- one module, all three workloads ---------------------------------------------------------------


def module_records(stdlib: Path, module: str, index: int) -> dict[str, dict]:
    path = stdlib / (module.replace(".", "/") + ".py")
    source = path.read_text(encoding="utf-8")
    lines, tree = source.splitlines(keepends=True), ast.parse(source)
    where = str(path.relative_to(stdlib))
    version = platform.python_version()

    text, first, last = completion_excerpt(lines, tree)
    completion = {"id": f"completion-{module}", "workload": "completion", "text": text}
    completion.update(max_new_tokens=COMPLETION_NEW_TOKENS, ignore_eos=True, source=f"{where}:{first}-{last}")

    kind = EDIT_KINDS[index % len(EDIT_KINDS)]
    sized = [(n, c) for n, c in functions(tree, lines) if EDIT_MIN_CHARS <= len(c) <= EDIT_MAX_CHARS]
    editable = [(n, c, i) for n, c in sized if (i := edit_instruction(kind, n))]
    if not editable:  # fall back through the other kinds in a fixed order
        editable = [(n, c, i) for k in EDIT_KINDS for n, c in sized if (i := edit_instruction(k, n))]
    node, code, instruction = middle(editable, f"an edit in {module}")
    edit = _instruct_record(f"edit-{module}-{node.name}", "edit", edit_prompt(code, instruction))
    edit["source"] = f"{where}:{node.lineno}-{node.end_lineno}"

    chat_candidates = [(n, c) for n, c in functions(tree, lines) if CHAT_MIN_CHARS <= len(c) <= CHAT_MAX_CHARS]
    chat_candidates = [(n, c) for n, c in chat_candidates if n.lineno != node.lineno] or chat_candidates
    chat_node, chat_code = chat_candidates[len(chat_candidates) // 3] if chat_candidates else (None, None)
    if chat_node is None:
        raise SystemExit(f"no candidate for a chat question in {module}")
    question = CHAT_QUESTIONS[index % len(CHAT_QUESTIONS)]
    chat = _instruct_record(f"chat-{module}-{chat_node.name}", "chat", chat_prompt(chat_code, question))
    chat["source"] = f"{where}:{chat_node.lineno}-{chat_node.end_lineno}"

    records = {"completion": completion, "edit": edit, "chat": chat}
    for record in records.values():
        record["python"] = version
    return records


def _instruct_record(record_id: str, workload: str, content: str) -> dict:
    return {
        "id": record_id,
        "workload": workload,
        "text": content,  # the user's message as plain text, for runners without a chat template
        "messages": [{"role": "user", "content": content}],
        "max_new_tokens": INSTRUCT_MAX_NEW_TOKENS,
        "ignore_eos": False,
    }


def build(modules: list[str]) -> dict[str, list[dict]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sets: dict[str, list[dict]] = {"completion": [], "edit": [], "chat": []}
    for index, module in enumerate(modules):
        for workload, record in module_records(stdlib, module, index).items():
            sets[workload].append(record)
    return sets


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def outputs(root: Path) -> dict[Path, str]:
    files = {}
    for folder, modules in ((root, COMMITTED_MODULES), (root / "heldout", HELDOUT_MODULES)):
        for workload, records in build(modules).items():
            files[folder / f"{workload}.jsonl"] = render(records)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument("--check", action="store_true", help="compare with the existing files instead of writing")
    args = parser.parse_args(argv)
    files = outputs(args.output)
    if args.check:
        stale = [p for p, content in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != content]
        for path in stale:
            print(f"{path} differs from a fresh cut (this is Python {platform.python_version()})", file=sys.stderr)
        if not stale:
            print(f"{len(files)} workload files under {args.output} are up to date")
        return 1 if stale else 0
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        print(f"wrote {path}: {content.count(chr(10))} prompts from Python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
