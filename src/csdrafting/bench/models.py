"""The benchmarked models, loaded once and shared by every method of a run: the transformers
modules the peers run, our own copies behind the cascade's levels, and their GGUF conversions
for the llama.cpp methods."""

from __future__ import annotations

from pathlib import Path

import torch

from ..backends import is_gguf, llama_level
from ..errors import ConfigError
from ..gguf_cache import cached_gguf
from ..gguf_tokenizer import LlamaCppTokenizer
from ..levels.mag import BigramTable
from ..levels.model import model_level
from ..loading import (
    DTYPES,
    Levels,
    check_same_tokenizer,
    eos_ids,
    load_model,
    load_tokenizer,
    resolve_device,
)

TARGET_OUTTYPE = "f32"  # the target as given: an HF float32 folder


class Models:
    """The target and drafters: transformers' methods run on the modules as ``from_pretrained``
    loads them; our levels get their own copies, loaded on first use (one per model and runner),
    because our lean runner re-lays the weights out (fused projections, the kernels' layouts, or
    packed into a form the module cannot run) and transformers' methods are measured as users run
    them, not on our layout.

    A GGUF target (``--target X.gguf``, a family with no HF folder) is a llama.cpp-only family: no
    transformers modules load, the tokenizer and the end-of-generation ids come from the GGUF, and
    every level runs on llama.cpp (``llama_levels``)."""

    def __init__(
        self,
        target: str,
        drafters: list[str],
        device: str,
        dtype: str,
        bigram: str | None,
        runner: str,
        drafter_outtype: str = "q8_0",
        gguf_dir: Path | None = None,
        kernel: str = "auto",
    ):
        self.device = resolve_device(device)
        self.dtype_name = dtype
        torch_dtype = DTYPES[dtype]
        self.paths = {Path(target).name: str(target)}
        for path in drafters:
            name = Path(path).name
            if name in self.paths:
                raise ConfigError(f"two models are named {name!r}: benchmark models need distinct folder names")
            self.paths[name] = str(path)
        self.target_name = Path(target).name
        self.drafter_names = [Path(p).name for p in drafters]
        self.gguf_family = is_gguf(target)
        self.runner = runner
        self.kernel = kernel
        self._torch_dtype = torch_dtype
        self._level_modules: dict[tuple[str, str], torch.nn.Module] = {}  # our copies, see the class docstring
        self._levels: dict[tuple[str, str], object] = {}
        self.drafter_outtype = drafter_outtype
        self.gguf_dir = gguf_dir
        self._llama_levels = None
        self.bigram_path = None
        self.bigram = None
        bigram_path = Path(bigram) if bigram is not None else Path(target) / "csd_bigram.npy"
        if bigram is not None and not bigram_path.is_file():
            raise ConfigError(f"bigram table not found: {bigram_path}")
        if bigram_path.is_file():
            self.bigram = BigramTable.load(bigram_path)
            self.bigram_path = str(bigram_path)
        if self.gguf_family:
            self._load_gguf_family(drafters)
        else:
            self._load_hf_family(target, drafters)

    def _load_hf_family(self, target: str, drafters: list[str]) -> None:
        """The transformers modules the peers run (our levels load their own copies on first use)."""
        self.tokenizer = load_tokenizer(target)
        for path in drafters:
            check_same_tokenizer(self.tokenizer, path)
        self.modules = {name: load_model(path, self.device, self._torch_dtype) for name, path in self.paths.items()}
        self.num_params = {name: sum(p.numel() for p in m.parameters()) for name, m in self.modules.items()}
        self.weight_bytes = {
            name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in self.modules.items()
        }
        target_module = self.modules[self.target_name]
        self.eos_token_ids = eos_ids(target_module, self.tokenizer)
        pad = getattr(target_module.generation_config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.max_context = int(getattr(target_module.config, "max_position_embeddings", 1 << 30))
        # transformers peers: count forward calls per model with a pre-hook (microseconds per call)
        self.num_forwards = dict.fromkeys(self.modules, 0)
        for name, module in self.modules.items():
            module.register_forward_pre_hook(self._counter(name))

    def _load_gguf_family(self, drafters: list[str]) -> None:
        """A GGUF target: the tokenizer and end-of-generation ids from its file; parameters, context
        and weight bytes from the llama.cpp levels, loaded now (every method runs on them)."""
        if self.device.type != "cpu":
            raise ConfigError(f"a GGUF target runs on llama.cpp, on the CPU: use device 'cpu', not {self.device}")
        self.tokenizer = LlamaCppTokenizer(self.paths[self.target_name])
        vocab = None
        for path in drafters:
            vocab = check_same_tokenizer(self.tokenizer, path, vocab)
        self.modules = {}
        self.num_forwards = {}
        self.eos_token_ids = sorted(self.tokenizer.eos_token_ids)
        self.pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        levels = self.llama_levels()
        runners = {level.name: level.runner for level in (levels.target, *levels.drafters)}
        self.num_params = {name: runner.num_params for name, runner in runners.items()}
        self.weight_bytes = {name: self.gguf(name).stat().st_size for name in runners}
        self.max_context = runners[self.target_name].max_positions

    @classmethod
    def for_config(cls, config) -> Models:
        """The models a ``BenchConfig`` or ``ProfileConfig`` names (both carry the same fields)."""
        fields = ("target", "drafters", "device", "dtype", "bigram", "runner", "drafter_outtype", "gguf_dir", "kernel")
        return cls(*(getattr(config, name) for name in fields))

    def gguf(self, name: str) -> Path:
        """The GGUF file of model ``name``: a .gguf path as given, else its folder converted once (the
        target f32, drafters at ``drafter_outtype``)."""
        if is_gguf(self.paths[name]):
            return Path(self.paths[name])
        outtype = TARGET_OUTTYPE if name == self.target_name else self.drafter_outtype
        return cached_gguf(self.paths[name], outtype, self.gguf_dir)

    def llama_levels(self):
        """One ``Levels`` over llama.cpp runners of every model, shared by the llama.cpp methods
        (a configuration selects its drafters by name)."""
        if self._llama_levels is None:
            # the tokenizer, bigram table and EOS ids the torch methods use, so both backends draft
            # from the same MaG and stop on the same tokens
            names = [self.target_name, *self.drafter_names]
            paths = [self.gguf(name) for name in names]
            levels = [llama_level(name, path) for name, path in zip(names, paths)]
            self._llama_levels = Levels.from_models(
                levels[0], levels[1:], self.tokenizer, names=names, bigram=self.bigram, eos_token_ids=self.eos_token_ids
            )
        return self._llama_levels

    def _counter(self, name: str):
        def hook(module, args):
            self.num_forwards[name] += 1

        return hook

    def level(self, name: str, runner: str | None = None):
        """One shared neural level per (model, runner), over our own copy of the model."""
        runner = runner or self.runner
        key = (name, runner)
        if key not in self._levels:
            # one copy per level: the lean runner may take its module's weights over (packed)
            self._level_modules[key] = load_model(self.paths[name], self.device, self._torch_dtype)
            self._levels[key] = model_level(
                name, self._level_modules[key], runner, own_weights=True, kernel=self.kernel
            )
        return self._levels[key]

    def levels(self, drafters: list[str], runner: str | None = None):
        """``Levels`` over the shared levels of the target and ``drafters``, for one ``Cascade``."""
        return Levels(
            self.level(self.target_name, runner),
            tuple(self.level(name, runner) for name in drafters),
            self.tokenizer,
            frozenset(self.eos_token_ids),
            self.bigram,
            (self.target_name, *drafters),
        )

    def runner_bytes(self, name: str, runner: str | None = None) -> int:
        """Bytes our backend for ``name`` holds beyond the model's parameters (fused weight copies,
        KV buffers): every tensor reachable from its attributes whose storage no parameter shares."""
        runner = runner or self.runner
        backend = getattr(self.level(name, runner), "runner", None)
        if backend is None:
            return 0
        shared = {p.untyped_storage().data_ptr() for p in self._level_modules[name, runner].parameters()}
        seen: set[int] = set()
        total = 0
        stack = list(vars(backend).values())
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                if item.is_mkldnn:
                    continue  # packed weights: held in place of the module's (released) parameters
                ptr = item.untyped_storage().data_ptr()
                if ptr not in shared and ptr not in seen:
                    seen.add(ptr)
                    total += item.untyped_storage().nbytes()
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
        return total

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def describe(self, names: list[str]) -> dict:
        return {n: {"path": self.paths[n], "num_params": self.num_params[n]} for n in names}
