"""bigtrain: 3D-parallel Llama-style pretraining on DeepSpeed and megatron-core."""

__version__ = "0.1.0"
