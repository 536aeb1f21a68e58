"""Hugging Face Llama folder -> GGUF file for llama.cpp (``csd convert``).

Written with the ``gguf`` package's ``GGUFWriter``. What llama.cpp's ``llama`` architecture needs
that a plain copy of the weights would get wrong:

* RoPE layout: HF rotates the two *halves* of a head (``rotate_half``: component i pairs with
  i + D/2); llama.cpp's ``llama`` graph rotates *adjacent pairs* (2j, 2j+1). The rows of q_proj and
  k_proj are permuted per head so that llama.cpp's pairs hold what HF's pairs held (exact: rows move,
  no arithmetic).
* Tied embeddings: no ``output`` tensor is written; llama.cpp then uses ``token_embd`` for the head.
* Tokenizer: a byte-level BPE ``tokenizer.json`` becomes llama.cpp's ``gpt2`` vocabulary with a
  pre-tokenizer whose split is the GPT-2 regex that the ``ByteLevel`` pre-tokenizer uses (llama.cpp
  implements it natively). llama.cpp knows that split under several names that differ only in
  detokenization: ``gpt-2`` also strips spaces before punctuation (``x += ' '`` comes back as
  ``x +=''``), ``trillion`` does not. transformers 5 never applies that clean-up to a BPE
  tokenizer ("destructive for BPE"), so ``trillion`` is the name that decodes as the HF tokenizer
  does. A folder without ``tokenizer.json`` gets a ``none`` vocabulary of ``vocab_size``
  placeholder tokens: the file runs on token ids only.

Output types: f32, f16, bf16, q8_0 for 2-D weights; norms (1-D) always stay f32, as llama.cpp
expects. q8_0 needs rows that are a multiple of 32 values; a matrix whose rows are not is stored
as f16 instead (reported in the result).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError, ModelLoadError
from .files import atomic_write

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's name for the GPT-2 regex split without detokenization clean-up (see above)
LLAMA_CPP_PRE_TOKENIZER = "trillion"
# the regex transformers' ByteLevel pre-tokenizer applies with use_regex=True (GPT-2's)
_BYTE_LEVEL_REGEX_OPTIONS = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    outtype: str
    num_tensors: int
    num_params: int
    has_tokenizer: bool
    fallback_tensors: tuple[str, ...]  # q8_0 only: matrices stored as f16 (rows not a multiple of 32)


def convert(hf_folder: str | os.PathLike, output: str | os.PathLike, outtype: str = "f32") -> ConvertResult:
    """Write the Llama model in ``hf_folder`` to the GGUF file ``output`` (replaced if it exists)."""
    gguf = import_gguf()
    if outtype not in OUTTYPES:
        raise ConfigError(f"unknown outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    folder = Path(hf_folder)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder not found: {folder}")
    config = _read_json(folder / "config.json")
    _check_supported(config, folder)
    weights = _load_weights(folder)
    tokenizer = _read_tokenizer(folder)

    tensors, fallbacks, num_params = [], [], 0  # (name, data, ggml type); q8_0 matrices kept f16
    for name, array in _gguf_tensors(weights, config):
        data, qtype = _encode(array, outtype, gguf)
        if outtype == "q8_0" and array.ndim == 2 and qtype != gguf.GGMLQuantizationType.Q8_0:
            fallbacks.append(name)
        tensors.append((name, data, qtype))
        num_params += array.size

    def write_gguf(temporary: Path) -> None:
        writer = gguf.GGUFWriter(temporary, "llama")
        _add_hyperparameters(writer, gguf, config, outtype, folder.name)
        if tokenizer is None:
            writer.add_tokenizer_model("none")  # llama.cpp then makes vocab_size placeholder tokens
        else:
            _add_tokenizer(writer, gguf, tokenizer, config)
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    output = Path(output)
    try:
        atomic_write(output, write_gguf)  # a failed conversion leaves no half file
    except OSError as exc:
        raise ModelLoadError(f"cannot write {output}: {exc}") from None
    return ConvertResult(output, outtype, len(tensors), num_params, tokenizer is not None, tuple(fallbacks))


def import_gguf():
    try:
        import gguf
    except (ImportError, OSError, RuntimeError):
        raise ConfigError("converting to GGUF needs the gguf package: pip install -e '.[llama]'") from None
    return gguf


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path.name} not found in {path.parent}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def _check_supported(config: dict, folder: Path) -> None:
    """Only what llama.cpp's ``llama`` graph computes exactly as transformers' LlamaForCausalLM."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    problems = []
    if config.get("model_type") != "llama":
        problems.append(f"model_type is {config.get('model_type')!r}, not 'llama'")
    if rope.get("rope_type", "default") != "default":
        problems.append(f"RoPE scaling {rope.get('rope_type')!r} is not supported")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("biased attention or MLP projections are not supported")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {config.get('hidden_act')!r} is not supported (only silu)")
    if config.get("pretraining_tp", 1) != 1:
        problems.append("pretraining_tp != 1 is not supported")
    if problems:
        raise ConfigError(f"cannot convert {folder}: only plain Llama models convert; " + "; ".join(problems))


def _tied(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", False))


def _load_weights(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of the folder's safetensors files as float32 numpy arrays (bfloat16 included)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    weights = {}
    for file in files:
        try:
            tensors = load_file(file)
        except (OSError, SafetensorError) as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from None
        weights.update({name: tensor.to(torch.float32).numpy() for name, tensor in tensors.items()})
    return weights


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_hyperparameters(writer, gguf, config: dict, outtype: str, name: str) -> None:
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    rope = config.get("rope_parameters") or {}
    head_dim = _head_dim(config)
    writer.add_name(name)
    writer.add_file_type(file_types[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))


def _gguf_tensors(weights: dict[str, np.ndarray], config: dict):
    """(llama.cpp name, array) for every tensor, q and k rows in llama.cpp's RoPE order."""
    num_heads = int(config["num_attention_heads"])
    num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
    layer_names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    try:
        yield "token_embd.weight", weights["model.embed_tokens.weight"]
        yield "output_norm.weight", weights["model.norm.weight"]
        if not _tied(config):  # tied: llama.cpp reuses token_embd as the head when output is absent
            yield "output.weight", weights["lm_head.weight"]
        for i in range(int(config["num_hidden_layers"])):
            for hf_name, gguf_name in layer_names.items():
                array = weights[f"model.layers.{i}.{hf_name}.weight"]
                if gguf_name == "attn_q":
                    array = pairs_from_halves(array, num_heads)
                elif gguf_name == "attn_k":
                    array = pairs_from_halves(array, num_kv_heads)
                yield f"blk.{i}.{gguf_name}.weight", array
    except KeyError as exc:
        raise ModelLoadError(f"weight {exc.args[0]} missing: not a LlamaForCausalLM checkpoint") from None


def pairs_from_halves(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder q/k projection rows (H*D, E) per head from HF's rotate-half layout, where component
    j pairs with j + D/2, to adjacent pairs: new row 2j is old row j, new row 2j+1 is old row j + D/2."""
    rows, hidden = weight.shape
    head_dim = rows // num_heads
    halves = weight.reshape(num_heads, 2, head_dim // 2, hidden)  # (H, half, D/2, E)
    return np.ascontiguousarray(halves.swapaxes(1, 2).reshape(rows, hidden))  # (H*D, E)


def _encode(array: np.ndarray, outtype: str, gguf):
    """(data, ggml type) of one tensor in the requested output type; 1-D tensors stay f32."""
    types = gguf.GGMLQuantizationType
    qtype = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[outtype]
    if array.ndim == 1:
        qtype = types.F32
    elif qtype == types.Q8_0 and array.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] != 0:
        qtype = types.F16
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), qtype


def _read_tokenizer(folder: Path) -> dict | None:
    """The folder's tokenizer.json, checked to be a byte-level BPE llama.cpp reproduces; None if absent."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    tokenizer = _read_json(path)
    model = tokenizer.get("model") or {}
    pre = tokenizer.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or tokenizer.get("normalizer") is not None:
        raise ConfigError(f"{path}: only byte-level BPE tokenizers without a normalizer convert")
    if any(pre.get(key) != value for key, value in _BYTE_LEVEL_REGEX_OPTIONS.items()):
        raise ConfigError(
            f"{path}: pre-tokenizer {json.dumps(pre)} has no llama.cpp equivalent here "
            "(expected ByteLevel with the GPT-2 regex and no prefix space)"
        )
    return tokenizer


def _add_tokenizer(writer, gguf, tokenizer: dict, config: dict) -> None:
    """Tokens by id, their types, merges, special ids. Ids the tokenizer lacks below ``vocab_size``
    (padded embeddings) become unused placeholder tokens, as llama.cpp needs one token per row."""
    vocab_size = int(config["vocab_size"])
    model = tokenizer["model"]
    by_id = {token_id: token for token, token_id in model["vocab"].items()}
    types = {token_id: gguf.TokenType.NORMAL for token_id in by_id}
    for added in tokenizer.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise ConfigError(f"tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(LLAMA_CPP_PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for role in ("bos", "eos", "pad"):  # the ids the model was trained with, from config.json
        token_id = config.get(f"{role}_token_id")
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
        if isinstance(token_id, int):
            getattr(writer, f"add_{role}_token_id")(token_id)
    # llama.cpp adds BOS/EOS when tokenizing exactly when the HF post-processor does
    adds_bos, adds_eos = _added_specials(tokenizer.get("post_processor"))
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(adds_eos)


def _added_specials(post_processor: dict | None) -> tuple[bool, bool]:
    """Whether the HF post-processor puts a special token before / after a single sequence."""
    if post_processor is None or post_processor.get("type") == "ByteLevel":
        return False, False
    if post_processor.get("type") != "TemplateProcessing":
        raise ConfigError(f"tokenizer post-processor {post_processor.get('type')!r} is not supported")
    single = post_processor.get("single") or []
    return bool(single) and "SpecialToken" in single[0], bool(single) and "SpecialToken" in single[-1]
