#!/usr/bin/env bash
""":"
# bigtrain fine-tuning launcher, valid as both bash and Python: launch/pretrain.sh with BIGTRAIN_ENTRY
# defaulting to bigtrain.finetune, so every way of launching pretraining works the same:
#   deepspeed [launcher args] launch/finetune.sh --config configs/sft-tiny.yaml [--set key=value ...]
#   bash launch/finetune.sh --config ... (starts the DeepSpeed launcher itself; see pretrain.sh)
export BIGTRAIN_ENTRY="${BIGTRAIN_ENTRY:-bigtrain.finetune}"
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pretrain.sh" "$@"
":"""
# Python reading (the DeepSpeed launcher runs `python launch/finetune.sh ...` on every rank).
import os
import sys

os.environ.setdefault("BIGTRAIN_ENTRY", "bigtrain.finetune")
os.environ.setdefault("BIGTRAIN_PYTHON", sys.executable)
os.execvp("bash", ["bash", os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.sh"), *sys.argv[1:]])
