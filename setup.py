"""Install the BLOOM pretraining framework: its packages, Hydra configs and console scripts."""
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def package_files(root: str, patterns=("*.yaml", "*.jsonl", "*.json", "*.txt")):
    """Data files under a package, relative to it, so a non-editable install carries them."""
    base = HERE / root
    found = []
    for pattern in patterns:
        found += [str(p.relative_to(base)) for p in base.rglob(pattern)]
    return sorted(found)


setup(
    name="bloom-pretrain",
    version="0.1.0",
    description="Pretrain the BLOOM family with 3D parallelism (Megatron TP, DeepSpeed PP + ZeRO DP)",
    python_requires=">=3.11",  # 3.11 here; 3.12 on the GPU machines (benchmarks/gpu_check.sh)
    packages=["training", "training.model", "training.checkpoint", "training.hf", "training.config",
              "training.plan", "training.evaluation", "training.engine", "parallelism", "configs", "data", "launch"],
    package_data={"configs": package_files("configs"), "data": package_files("data"),
                  "training.plan": package_files("training/plan")},
    install_requires=[
        # torch is pinned so pip never swaps the CPU wheel for a multi-GB CUDA build;
        # on a GPU cluster install the matching CUDA torch first and pip keeps it.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "deepspeed>=0.19,<0.20",
        "transformers>=4.44",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "xxhash>=3",  # checkpoint checksums (training/checkpoint/files.py)
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3",
        "numpy",
        "tqdm",
        "datasets>=2.14",
        "pyarrow>=12",  # Parquet / Arrow IPC inputs of bloom-preprocess (data/columnar.py)
        "tensorboard",
        "wandb",
        "matplotlib",  # bloom-plot
        "msgpack>=1",  # bloom-export --flax writes flax_model.msgpack (training/hf/flax_export.py)
    ],
    extras_require={
        # lm-evaluation-harness for bloom-eval --tasks and trainer.eval_tasks
        # (training/evaluation/harness.py follows its 0.4.13 HF model, hence the exact pin).
        "eval": ["lm-eval==0.4.13"],
        # [hf]: tests/test_harness.py compares with lm_eval's own HF model on the export.
        "test": ["pytest>=8", "lm-eval[hf]==0.4.13"],
    },
    entry_points={
        "console_scripts": [
            "bloom-train=launch.train_cli:main",
            "bloom-preprocess=data.preprocess:main",
            "bloom-slurm=launch.slurm:main",
            "bloom-export=launch.export_cli:main",
            "bloom-import=launch.import_cli:main",
            "bloom-extend-vocab=launch.extend_vocab_cli:main",
            "bloom-eval=launch.eval_cli:main",
            "bloom-plan=launch.plan_cli:main",
            "bloom-plot=launch.plot_cli:main",
        ]
    },
)
