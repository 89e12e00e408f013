"""training/checkpoint/safe_unpickle.py: the .pt files Megatron-DeepSpeed and DeepSpeed write are
read with the types they hold (written here by the real classes), and a pickle naming any other
global is refused in one line with nothing run (a sentinel file its payload would create stays
absent)."""
import argparse
import os
import random
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from training.checkpoint.safe_unpickle import FragmentAddress, UnsafePickle, load


class _RunsCode:
    """Unpickled by plain pickle, this calls os.system (the classic malicious .pt file)."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


class _Evaluates:
    def __reduce__(self):
        return eval, ("1 + 1",)


def _megatron_enum(monkeypatch):
    """BigScience's megatron.enums.PositionEmbeddingType (an Enum in args), made importable under
    that name so that pickle writes it as Megatron-DeepSpeed did; megatron-core has no such module."""
    import enum
    import types

    module = types.ModuleType("megatron.enums")
    module.PositionEmbeddingType = enum.Enum("PositionEmbeddingType", "rotary absolute alibi", module="megatron.enums")
    monkeypatch.setitem(sys.modules, "megatron.enums", module)
    return module.PositionEmbeddingType.alibi


def test_reads_what_megatron_deepspeed_files_hold(tmp_path, monkeypatch):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.utils.tensor_fragment import fragment_address

    alibi = _megatron_enum(monkeypatch)
    args = argparse.Namespace(num_layers=70, hidden_size=14336, params_dtype=torch.bfloat16, iteration=95000,
                              position_embedding_type=alibi)
    state = {"args": args, "iteration": 95000, "np_rng_state": np.random.get_state(),
             "random_rng_state": random.getstate(), "param_shapes": [OrderedDict(w=torch.Size([4, 2]))],
             "param_slice_mappings": [OrderedDict(w=fragment_address(numel=8, start=16))],
             "loss_scaler": DynamicLossScaler(2.0 ** 16, 1000, 1, 2, False), "fp32": torch.arange(24.0)}
    torch.save(state, tmp_path / "mp_rank_00_model_states.pt")
    monkeypatch.delitem(sys.modules, "megatron.enums")  # reading imports nothing of Megatron's
    got = load(tmp_path / "mp_rank_00_model_states.pt")
    assert isinstance(got["args"], argparse.Namespace) and got["args"].num_layers == 70
    assert got["args"].params_dtype is torch.bfloat16 and got["args"].position_embedding_type.args == (3,)
    address = got["param_slice_mappings"][0]["w"]
    assert isinstance(address, FragmentAddress) and (address.start, address.numel) == (16, 8)
    assert torch.equal(got["fp32"], torch.arange(24.0)) and got["param_shapes"][0]["w"] == torch.Size([4, 2])
    assert got["iteration"] == 95000


def test_admits_its_own_list_only(tmp_path):
    """megatron-core admits numpy's real constructors and classes such as io.BytesIO process-wide
    when imported: the reader still reads numpy state through its stand-ins, refuses BytesIO, and
    leaves the process-wide list as it found it."""
    import io

    from megatron.core.safe_globals import register_safe_globals

    register_safe_globals()
    before = torch.serialization.get_safe_globals()
    torch.save({"np_rng_state": np.random.get_state()}, tmp_path / "rng.pt")
    assert load(tmp_path / "rng.pt")["np_rng_state"][0] == "MT19937"
    torch.save({"buffer": io.BytesIO(b"x")}, tmp_path / "bytes.pt")
    with pytest.raises(UnsafePickle, match="BytesIO"):
        load(tmp_path / "bytes.pt")
    assert set(map(repr, torch.serialization.get_safe_globals())) == set(map(repr, before))


@pytest.mark.parametrize("payload", ["os.system", "eval"])
def test_refuses_other_globals_and_runs_nothing(tmp_path, payload):
    sentinel = tmp_path / "sentinel"
    bad = tmp_path / "layer_01-model_00-model_states.pt"
    torch.save({"weight": torch.ones(2), "x": _RunsCode(sentinel) if payload == "os.system" else _Evaluates()}, bad)
    with pytest.raises(UnsafePickle) as refused:
        load(bad)
    message = str(refused.value)
    assert "\n" not in message and str(bad) in message
    assert ("system" in message) if payload == "os.system" else ("eval" in message)
    assert not sentinel.exists()



def test_bloom_import_refuses_in_one_line(tmp_path):
    """Through the command: exit 2, one line on stderr naming the file and the global, no sentinel."""
    step = tmp_path / "global_step7"
    step.mkdir()
    sentinel = tmp_path / "sentinel"
    torch.save({"args": _RunsCode(sentinel)}, step / "mp_rank_00_model_states.pt")
    result = subprocess.run([sys.executable, "-m", "launch.import_cli", "--from", "megatron-deepspeed", str(step),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("bloom-import")]
    assert len(lines) == 1 and "system" in lines[0] and "mp_rank_00_model_states.pt" in lines[0], result.stderr
    assert not sentinel.exists()
