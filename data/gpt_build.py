"""How the data pipeline calls megatron-core: the GPTDatasetConfig of a blend, and a GPTDataset
that opens each .bin/.idx prefix once.

megatron-core opens an IndexedDataset (two memory maps, two file descriptors) for every prefix in
every builder call; the train split, the valid split and the per-language validation sets are
three calls. With thousands of prefixes that is thousands of redundant opens and a descriptor
count past common `ulimit -n` values. `gpt_dataset_class()` returns a GPTDataset whose prefixes are
opened once per build_datasets call and shared by every split.
"""
import threading

from data.tokenizer import TokenizerInfo


def gpt_config(cfg, tokenizer: TokenizerInfo, prefixes: list, weights: list | None):
    """megatron-core's GPTDatasetConfig for these prefixes (weights None: one epoch of each)."""
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    return GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=(list(prefixes), weights),
        split=cfg.split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=False,  # causal (ALiBi) attention builds its own mask
        path_to_cache=None,  # set per build, see data.index_cache
    )


def gpt_dataset_class():
    """megatron-core's GPTDataset, each prefix opened once until the next call."""
    cls = globals().get("GPTDataset")
    if cls is None:
        cls = globals()["GPTDataset"] = _define()
    cls.opened = {}
    return cls


def _define():
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPTDataset

    lock = threading.Lock()  # megatron-core builds prefixes on a thread pool

    def build_low_level_dataset(dataset_path: str, config):
        with lock:
            opened = cls.opened
            if dataset_path not in opened:
                opened[dataset_path] = MegatronGPTDataset.build_low_level_dataset(dataset_path, config)
            return opened[dataset_path]

    # Named GPTDataset, in this module's globals (so pickle finds it): megatron-core hashes the
    # class name into its cache keys and file names, so caches built before stay valid.
    cls = type("GPTDataset", (MegatronGPTDataset,),
               {"build_low_level_dataset": staticmethod(build_low_level_dataset), "__module__": __name__,
                "__qualname__": "GPTDataset", "opened": {}})
    return cls
