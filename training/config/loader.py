"""Compose the Hydra config tree in configs/ onto the typed schema, with one-line errors.

The compose API is used rather than @hydra.main: bloom-train must own its error messages (one line
naming the bad key or value, no traceback) and must not change the working directory.
"""
from pathlib import Path
from typing import List

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import configs
from training.config.schema import ConfigError, RootConfig

CONFIG_DIR = Path(configs.__file__).parent

ConfigStore.instance().store(name="bloom_schema", node=RootConfig)


def _one_line(error: Exception) -> str:
    """The most specific message in an exception chain, on one line, with the key it concerns."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for err in chain:
        key = getattr(err, "full_key", None)
        if isinstance(err, OmegaConfBaseException) and key:
            text = str(err).splitlines()[0].strip()
            return f"{key}: {text}"
    lines = [line.strip() for line in str(chain[0]).splitlines() if line.strip()]
    if not lines:
        return type(chain[0]).__name__
    if len(lines) > 1 and lines[1].startswith("Available options"):
        return f"{lines[0]} (available: {', '.join(lines[2:])})"
    return "; ".join(lines[:3])


def load_config(overrides: List[str] = ()) -> RootConfig:
    """The typed config for these command-line overrides (Hydra syntax), as written: parallel.auto
    is applied by training.plan.planner.load_planned_config, which the commands call."""
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            composed = compose("config", overrides=list(overrides))
        cfg = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(_one_line(error)) from None
    return cfg


def to_yaml(cfg: RootConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
