"""Every random stream of a rank (Python, NumPy, torch CPU and CUDA, the TP tracker's), as the
tensors, ints and lists a weights_only torch.load accepts."""
import random

import numpy as np
import torch


def rng_state(engine) -> dict:
    """Every random stream this rank draws from, as tensors, ints and lists (weights_only-safe)."""
    version, keys, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"python": [version, list(keys), gauss],
             "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
             "torch": torch.get_rng_state(), "tp": engine.tp_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(engine, state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    engine.set_tp_rng_state(state["tp"])
