"""Fine-tuning (SFT, classification, LoRA) on bigtrain's parallel engine: ``python -m bigtrain.finetune``."""
