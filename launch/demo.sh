#!/usr/bin/env bash
# make demo: local text -> tokenizer -> indexed dataset -> 2-process pretraining -> evaluation
# -> Hugging Face export -> generation. Everything lands in demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
OUT=demo_out
ngpu="$(python -c 'import torch; print(torch.cuda.device_count())')"
nproc=$(( ngpu > 0 ? ngpu : 2 ))
start=$(date +%s)
step() { echo; echo "==> [$(( $(date +%s) - start ))s] $*"; }

step "building a corpus from the Python installation's own docs and sources"
python tools/build_demo_corpus.py --output "$OUT/text"

step "training a 4k BPE sentencepiece tokenizer (HF files included)"
python -m tokenizer.train --input "$OUT/text/train.jsonl" --vocab-size 4096 --model-type bpe --output "$OUT/tokenizer"

step "tokenizing into megatron-core indexed datasets"
python -m tokenizer.preprocess --input "$OUT/text/train.jsonl" --tokenizer "$OUT/tokenizer" \
    --output-prefix "$OUT/data/corpus" --workers 2
python -m tokenizer.preprocess --input "$OUT/text/valid.jsonl" --tokenizer "$OUT/tokenizer" \
    --output-prefix "$OUT/data/valid" --workers 2

step "pretraining configs/demo.yaml on $nproc processes (deepspeed launcher)"
rm -rf "$OUT/run"
deepspeed --num_gpus "$nproc" launch/pretrain.sh --config configs/demo.yaml

step "evaluating on held-out text"
python -m bigtrain.evaluate --config configs/demo.yaml --data "$OUT/data/valid" | tail -n 1

step "exporting to Hugging Face format"
python tools/convert_to_hf.py --checkpoint "$OUT/run/checkpoints" --output "$OUT/hf"

step "sampling from the exported model with transformers"
python tools/generate.py --hf "$OUT/hf" --prompt "The for statement" --max-new-tokens 48 --greedy

python - <<'PY'
import json
rows = [json.loads(l) for l in open("demo_out/run/metrics.jsonl") if '"loss"' in l]
first, last = rows[0]["loss"], rows[-1]["loss"]
print(f"\ntraining loss {first:.3f} -> {last:.3f} over {rows[-1]['step']} steps")
assert last < first - 1.0, "loss did not fall"
PY
step "done (demo_out/: tokenizer, data, run with metrics.jsonl + tensorboard, hf export)"
