"""Compose the Hydra config tree in configs/ onto the typed schema, with one-line errors.

The compose API is used rather than @hydra.main: bloom-train must own its error messages (one line
naming the bad key or value, no traceback) and must not change the working directory.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import configs
from data.config import DataConfig
from training.config.schema import (LauncherConfig, LoggingConfig, ModelConfig, OptimConfig,
                                    ParallelConfig, TrainerConfig)

CONFIG_DIR = Path(configs.__file__).parent


class ConfigError(ValueError):
    """A config that cannot run; the message is one line naming the value."""


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


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
    """The resolved, typed config for these command-line overrides (Hydra syntax)."""
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            composed = compose("config", overrides=list(overrides))
        cfg = OmegaConf.to_object(composed)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(_one_line(error)) from None
    if cfg.parallel.auto:
        # Every rank and every launcher plans the same config, so all run the same winner.
        from training.plan.planner import apply_auto

        apply_auto(cfg)
    return cfg


def to_yaml(cfg: RootConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
