"""HF BloomForCausalLM tensors -> `flax_model.msgpack`, the file transformers 4.x's
FlaxBloomModel / FlaxBloomForCausalLM load (transformers 5 removed Flax).

Written with plain `msgpack`, not flax (flax + jax would be a heavy dependency for one file), in
exactly the format of `flax.serialization.to_bytes(params)` (flax/serialization.py):

- the params tree is a nested map of str keys; HF's Flax BLOOM names it
  transformer / {word_embeddings/embedding, word_embeddings_layernorm/{scale,bias},
  h/<i>/{input_layernorm, self_attention/{query_key_value,dense}, post_attention_layernorm,
  mlp/{dense_h_to_4h,dense_4h_to_h}}, ln_f}; LayerNorm weight -> `scale`, Linear weight ->
  `kernel` TRANSPOSED ((in, out), as nn.Dense keeps it), the embedding -> `embedding` (same
  layout); lm_head is tied and not stored (HF's Flax BLOOM uses the embedding's transpose);
- an array leaf is msgpack ExtType 1 whose payload is msgpack of (shape, dtype name, C-order
  bytes) with `use_bin_type=True`; bf16 is named "bfloat16" (flax reads it back as jax's bfloat16);
- an array above flax's MAX_CHUNK_SIZE (2**30 bytes; msgpack cannot hold a leaf of 2**31 bytes)
  becomes {"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": flat
  piece, ...}}, pieces of 2**30 // itemsize elements, as flax's `_chunk` makes them.

Sharding follows transformers' `flax_shard_checkpoint`: above max_shard_size the params go into
flax_model-0000X-of-0000N.msgpack (each a nested tree of its own weights) plus
flax_model.msgpack.index.json mapping "transformer/h/0/..." names to files.
"""
import json
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import msgpack
import torch

FLAX_WEIGHTS = "flax_model.msgpack"
FLAX_INDEX = "flax_model.msgpack.index.json"
MAX_CHUNK_SIZE = 2 ** 30  # flax.serialization.MAX_CHUNK_SIZE
NDARRAY_EXT = 1  # flax.serialization._MsgpackExtType.ndarray
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# HF's PyTorch module name (last component) -> how its `weight` is named in Flax.
LAYER_NORMS = ("word_embeddings_layernorm", "input_layernorm", "post_attention_layernorm", "ln_f")
LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def flax_name(hf_name: str, tensor: torch.Tensor) -> Tuple[Tuple[str, ...], torch.Tensor]:
    """(the Flax path, the tensor in Flax's layout) of one HF BloomForCausalLM parameter."""
    *module, kind = hf_name.split(".")
    owner = module[-1]
    if kind == "bias" and (owner in LAYER_NORMS or owner in LINEARS):
        return (*module, "bias"), tensor
    if kind == "weight" and owner == "word_embeddings":
        return (*module, "embedding"), tensor
    if kind == "weight" and owner in LAYER_NORMS:
        return (*module, "scale"), tensor
    if kind == "weight" and owner in LINEARS:
        return (*module, "kernel"), tensor.t()  # torch Linear (out, in) -> nn.Dense (in, out)
    raise ValueError(f"no Flax BLOOM name for {hf_name}")


def flax_tree(state: Dict[str, torch.Tensor]) -> dict:
    """The nested params dict FlaxBloomForCausalLM.params holds (lm_head.weight, tied, left out),
    in the order transformers' own conversion builds it from a safetensors file (names sorted), so
    the bytes equal what `FlaxBloomForCausalLM.from_pretrained(export, from_pt=True).save_pretrained`
    writes."""
    tree: dict = {}
    for hf_name in sorted(state):
        if hf_name == "lm_head.weight":
            continue
        path, value = flax_name(hf_name, state[hf_name])
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _flat(tree: dict, prefix: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], torch.Tensor]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _unflat(items: List[Tuple[Tuple[str, ...], torch.Tensor]]) -> dict:
    tree: dict = {}
    for path, value in items:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _ndarray_ext(tensor: torch.Tensor) -> msgpack.ExtType:
    """flax's _ndarray_to_bytes: msgpack((shape, dtype name, C-order bytes)) in ExtType 1."""
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(f"no Flax dtype for {tensor.dtype}")
    tensor = tensor.detach().cpu().contiguous()
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor  # numpy has no bf16
    payload = msgpack.packb((tuple(tensor.shape), DTYPE_NAMES[tensor.dtype], raw.numpy().tobytes()),
                            use_bin_type=True)
    return msgpack.ExtType(NDARRAY_EXT, payload)


def _chunked(tensor: torch.Tensor, max_chunk_size: int):
    """flax's _chunk_array_leaves_in_place for one leaf."""
    itemsize = tensor.element_size()
    if tensor.numel() * itemsize <= max_chunk_size:
        return tensor
    size = max(1, int(max_chunk_size / itemsize))
    flat = tensor.contiguous().reshape(-1)
    return {"__msgpack_chunked_array__": True,
            "shape": {str(i): n for i, n in enumerate(tensor.shape)},
            "chunks": {str(i): flat[start:start + size] for i, start in enumerate(range(0, flat.numel(), size))}}


def _pack(value, max_chunk_size: int) -> dict:
    if isinstance(value, dict):
        return {key: _pack(item, max_chunk_size) for key, item in value.items()}
    return _chunked(value, max_chunk_size)


def _default(value):
    if isinstance(value, torch.Tensor):
        return _ndarray_ext(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def write_tree(path: Path, tree: dict, max_chunk_size: int = MAX_CHUNK_SIZE) -> None:
    """flax.serialization.to_bytes(tree) into `path`, streamed one array at a time, so a large
    model's file is never held in memory whole."""
    packer = msgpack.Packer(default=_default, strict_types=True)
    with open(path, "wb") as f:
        _write_map(f, packer, tree, max_chunk_size)


def _write_map(f, packer: msgpack.Packer, tree: dict, max_chunk_size: int) -> None:
    f.write(packer.pack_map_header(len(tree)))
    for key, value in tree.items():
        f.write(packer.pack(key))
        if isinstance(value, dict) and "__msgpack_chunked_array__" not in value:
            _write_map(f, packer, value, max_chunk_size)
        else:
            f.write(packer.pack(_pack(value, max_chunk_size)))


def write_flax_weights(directory: Path, state: Dict[str, torch.Tensor], max_shard_size: int,
                       max_chunk_size: int = MAX_CHUNK_SIZE) -> int:
    """flax_model.msgpack (or transformers' Flax shards + index) of an HF state dict; the number
    of files written. Shards split where transformers' flax_shard_checkpoint splits."""
    items = list(_flat(flax_tree(state)))
    shards: List[list] = [[]]
    size = total = 0
    for path, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if size + nbytes > max_shard_size and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((path, tensor))
        size += nbytes
        total += nbytes
    if len(shards) == 1:
        write_tree(directory / FLAX_WEIGHTS, _unflat(shards[0]), max_chunk_size)
        return 1
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = FLAX_WEIGHTS.replace(".msgpack", f"-{number:05d}-of-{len(shards):05d}.msgpack")
        write_tree(directory / name, _unflat(shard), max_chunk_size)
        weight_map.update({"/".join(path): name for path, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / FLAX_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return len(shards)
