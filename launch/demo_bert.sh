#!/usr/bin/env bash
# make demo-bert: the encoder pipeline end to end. Number-word text -> a tokenizer with BERT's specials ->
# sentence-split indexed data -> 2-process MLM + NSP pretraining -> evaluation (masked-token and NSP
# accuracy) -> Hugging Face export -> transformers' fill-mask on held-out sentences -> fine-tuning a
# classifier -> BertForSequenceClassification accuracy. Everything lands in demo_out/bert/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
OUT=demo_out/bert
ngpu="$(python -c 'import torch; print(torch.cuda.device_count())')"
nproc=$(( ngpu > 0 ? ngpu : 2 ))
start=$(date +%s)
step() { echo; echo "==> [$(( $(date +%s) - start ))s] $*"; }

step "building a corpus with a learnable fill-in rule (tools/build_bert_demo_corpus.py)"
python tools/build_bert_demo_corpus.py --output "$OUT/text"

step "training a tokenizer with [CLS] [SEP] [MASK] (HF files with BERT's post-processor)"
python -m tokenizer.train --input "$OUT/text/train.jsonl" --vocab-size 420 --output "$OUT/tokenizer" --bert-specials

step "tokenizing into sentence-split indexed data"
python -m tokenizer.preprocess --input "$OUT/text/train.jsonl" --tokenizer "$OUT/tokenizer" \
    --output-prefix "$OUT/data/train" --split-sentences
python -m tokenizer.preprocess --input "$OUT/text/valid.jsonl" --tokenizer "$OUT/tokenizer" \
    --output-prefix "$OUT/data/valid" --split-sentences

step "pretraining configs/bert-demo.yaml (MLM + NSP) on $nproc processes"
rm -rf "$OUT/run" "$OUT/classify"
deepspeed --num_gpus "$nproc" launch/pretrain.sh --config configs/bert-demo.yaml

step "evaluating on held-out documents: MLM loss, masked-token accuracy, NSP accuracy"
python -m bigtrain.evaluate --config configs/bert-demo.yaml --data "$OUT/data/valid" --set data.train_samples=512 | tail -n 1

step "exporting to Hugging Face format (BertForPreTraining)"
python tools/convert_to_hf.py --checkpoint "$OUT/run/checkpoints" --output "$OUT/hf"

step "transformers' fill-mask pipeline on held-out sentences"
python - <<'PY'
import json
from transformers import pipeline
fill = pipeline("fill-mask", model="demo_out/bert/hf")
probes = [json.loads(line) for line in open("demo_out/bert/text/fill_mask.jsonl")]
hits = sum(fill(p["text"], top_k=1)[0]["token_str"].strip() == p["answer"] for p in probes)
print(f"{probes[0]['text']!r} -> {fill(probes[0]['text'], top_k=1)[0]['token_str'].strip()!r}")
print(f"fill-mask top-1 accuracy on held-out sentences: {hits}/{len(probes)} = {hits / len(probes):.1%}")
PY

step "fine-tuning a classifier from the pretrained encoder (configs/bert-demo-classify.yaml)"
deepspeed --num_gpus "$nproc" launch/finetune.sh --config configs/bert-demo-classify.yaml
python tools/convert_to_hf.py --checkpoint "$OUT/classify/checkpoints" --output "$OUT/hf-classify"

step "the exported BertForSequenceClassification on held-out sentences"
python - <<'PY'
import json
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tok = AutoTokenizer.from_pretrained("demo_out/bert/hf-classify")
model = AutoModelForSequenceClassification.from_pretrained("demo_out/bert/hf-classify").eval()
rows = [json.loads(line) for line in open("demo_out/bert/text/classify_valid.jsonl")]
with torch.no_grad():
    logits = model(**tok([r["text"] for r in rows], padding=True, return_tensors="pt")).logits
hits = sum(model.config.id2label[int(i)] == r["label"] for i, r in zip(logits.argmax(-1), rows))
print(f"{type(model).__name__} accuracy on held-out sentences: {hits}/{len(rows)} = {hits / len(rows):.1%}")
PY
step "done (demo_out/bert/: tokenizer, data, run, hf, classify, hf-classify)"
