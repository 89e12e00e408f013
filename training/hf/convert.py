"""Hugging Face BloomForCausalLM <-> tensor-parallel shards, driven by training/model/param_table.py.

HF stores the vocabulary it has (250880 for the released BLOOM: already padded); the training
model may pad further for its TP size. Rows added by padding are zero and never receive a target,
and are cut off again on export.
"""
from typing import Dict, List

import torch

from training.model.param_table import Split, iter_parameters, shard_tensor


def shard_from_hf(hf_state: Dict[str, torch.Tensor], num_layers: int, tp_rank: int, tp_size: int,
                  padded_vocab: int) -> Dict[str, torch.Tensor]:
    """The state dict of one TP rank of our BloomModel, from a full HF state dict."""
    shard = {}
    for name, hf_name, spec, _ in iter_parameters(num_layers):
        if hf_name not in hf_state:
            raise KeyError(f"the HF checkpoint has no {hf_name}")
        tensor = hf_state[hf_name]
        if spec.split is Split.VOCAB and tensor.shape[0] > padded_vocab:
            raise ValueError(
                f"the HF vocabulary ({tensor.shape[0]} rows) is larger than the model's padded "
                f"vocabulary ({padded_vocab}): raise model.vocab_size or model.padded_vocab_size")
        shard[name] = shard_tensor(tensor, spec.split, tp_rank, tp_size, padded_vocab).clone()
    return shard


def hf_from_shards(shards: List[Dict[str, torch.Tensor]], num_layers: int,
                   vocab_size: int) -> Dict[str, torch.Tensor]:
    """A full HF state dict from every TP rank's state dict (in rank order), vocab cut to vocab_size."""
    full = {}
    for name, hf_name, spec, _ in iter_parameters(num_layers):
        pieces = [shard[name] for shard in shards]
        if spec.split.dim is None:
            tensor = pieces[0]
        else:
            tensor = torch.cat(pieces, dim=spec.split.dim)
        if spec.split is Split.VOCAB:
            tensor = tensor[:vocab_size]
        full[hf_name] = tensor.clone()
    return full
