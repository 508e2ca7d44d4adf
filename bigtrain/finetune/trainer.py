"""Fine-tuning on the pretraining loop: the Trainer fed packed/classification batches, validation over
the whole validation set (loss, and for classification accuracy, macro P/R/F1 and a confusion matrix),
early stopping with patience and the best checkpoint by a chosen metric."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from bigtrain.metrics import console
from bigtrain.trainer import StepResult, Trainer, _to_device, eval_hook

Batch = dict[str, torch.Tensor]


def classification_metrics(preds: list[int], labels: list[int], num_labels: int) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 (a class never predicted has precision 0, as sklearn's
    zero_division=0) and the confusion matrix (rows: true class, columns: predicted)."""
    confusion = [[0] * num_labels for _ in range(num_labels)]
    for p, y in zip(preds, labels):
        confusion[y][p] += 1
    precision, recall, f1 = [], [], []
    for c in range(num_labels):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(num_labels))
        actual = sum(confusion[c])
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precision.append(p)
        recall.append(r)
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    n = max(1, len(labels))
    return {
        "val_accuracy": sum(confusion[c][c] for c in range(num_labels)) / n,
        "val_precision": sum(precision) / num_labels,
        "val_recall": sum(recall) / num_labels,
        "val_f1": sum(f1) / num_labels,
        "val_confusion": confusion,
    }


class EarlyStopping:
    """Tracks the best value of a metric (lower is better for losses) and the validations since."""

    def __init__(self, metric: str, patience: int, min_delta: float = 0.0):
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.lower_is_better = metric.endswith("loss")
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0

    def update(self, step: int, value: float) -> bool:
        """Record a validation; True when it is a new best."""
        if (
            self.best is None
            or (self.best - value if self.lower_is_better else value - self.best) > self.min_delta
        ):
            self.best, self.best_step, self.bad = value, step, 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience


class FinetuneTrainer(Trainer):
    """The Trainer on fine-tuning batches; validation covers every validation item each time."""

    def __init__(self, *args, chat_template: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.chat_template = chat_template  # sft: the template trained with (data.template_record)
        self.valid_items = list(self.make_valid_batches()) if self.make_valid_batches else []
        f = self.cfg.finetune
        self.stopper = EarlyStopping(f.metric, f.patience, f.min_delta)
        best = Path(self.cfg.train.run_dir) / "best" / "bigtrain.json"
        if self.state.step and best.is_file():  # resumed: RUN_DIR/best is only replaced by a better one
            saved = json.loads(best.read_text())
            if saved["best"]["metric"] == f.metric and saved["step"] <= self.state.step:
                self.stopper.best, self.stopper.best_step = saved["best"]["value"], saved["step"]
        # validation over the whole set with task metrics, in place of the pretraining loss-only one
        self.hooks = [finetune_eval_hook if h is eval_hook else h for h in self.hooks]
        report_parameters(self)

    def extra_state(self) -> dict[str, Any]:
        s = self.stopper
        state: dict[str, Any] = {"early_stopping": {"best": s.best, "best_step": s.best_step, "bad": s.bad}}
        if self.chat_template is not None:  # what the export writes and a resume compares (resume_rules)
            state["chat_template"] = self.chat_template
        return state

    def load_extra_state(self, saved: dict[str, Any]) -> None:
        """A resumed run keeps its patience count (validations without a gain) and best value."""
        es = saved.get("early_stopping")
        if es is not None:
            self.stopper.best, self.stopper.best_step, self.stopper.bad = (
                es["best"],
                es["best_step"],
                es["bad"],
            )

    def model_args(self, b: Batch) -> tuple:
        return b["tokens"], b["positions"], b["doc_ids"], b["labels"], b["loss_mask"]

    def pipeline_item(self, b: Batch) -> tuple:
        return (b["tokens"], b["positions"], b["doc_ids"]), (b["labels"], b["loss_mask"])

    def _eval_micro_batch(self, b: Batch) -> tuple:
        """eval_stats of one micro-batch on every rank. Under a pipeline only the last stage has the
        outputs: it computes the statistics itself (DeepSpeed's loss is averaged per micro-batch and
        over data-parallel ranks, not weighted) and shares them over the pipeline group. (The engine's
        loss function leaves the logits it returns intact in evaluation: see LMLoss.)"""
        from megatron.core import parallel_state

        from bigtrain.finetune.model import eval_stats

        task = self.cfg.finetune.task
        from bigtrain.models.parallelize import tensor_parallel

        tp = tensor_parallel(self.cfg)
        if not self.pipeline:
            out = self.engine.module.outputs(b["tokens"], b["positions"], b["doc_ids"])
            return eval_stats(task, out, b["labels"], b["loss_mask"], tp)
        _, out = self.engine.eval_batch(
            data_iter=iter([self.pipeline_item(b)]), return_logits=True, bcast_loss=False, num_micro_batches=1
        )
        stats = torch.zeros(2 + b["tokens"].shape[0], dtype=torch.float64, device=self.dist.device)
        if self.engine.is_last_stage():
            s, w, p = eval_stats(task, out, b["labels"], b["loss_mask"], tp)
            stats[0], stats[1] = s, w
            if p is not None:
                stats[2:] = p
        torch.distributed.all_reduce(stats, group=parallel_state.get_pipeline_model_parallel_group())
        return stats[0], stats[1], stats[2:].long() if task == "classify" else None

    @torch.no_grad()
    def evaluate_all(self) -> dict[str, Any] | None:
        """Validation over every item: token- (sft) or example-weighted (classify) loss, and metrics."""
        from megatron.core import parallel_state

        if not self.valid_items:
            return None
        classify = self.cfg.finetune.task == "classify"
        self.engine.eval()
        loss_sum = torch.zeros((), dtype=torch.float64)
        weight = torch.zeros((), dtype=torch.float64)
        preds, labels = [], []
        try:
            for b in self.valid_items:
                b = _to_device(b, self.dist.device)
                s, w, p = self._eval_micro_batch(b)
                loss_sum += float(s)
                weight += float(w)
                if classify:
                    keep = b["loss_mask"] > 0
                    preds += p[keep].tolist()
                    labels += b["labels"][keep].tolist()
        finally:
            self.engine.train()
        totals = torch.stack([loss_sum, weight])
        dp_group = parallel_state.get_data_parallel_group()
        if parallel_state.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(totals, group=dp_group)
        out: dict[str, Any] = {"val_loss": float(totals[0] / totals[1].clamp(min=1))}
        if classify:
            if parallel_state.get_data_parallel_world_size() > 1:
                gathered: list[Any] = [None] * parallel_state.get_data_parallel_world_size()
                torch.distributed.all_gather_object(gathered, (preds, labels), group=dp_group)
                preds = [p for g in gathered for p in g[0]]
                labels = [y for g in gathered for y in g[1]]
            out.update(classification_metrics(preds, labels, len(self.cfg.finetune.labels)))
            out["val_examples"] = len(labels)
        return out


def report_parameters(trainer: FinetuneTrainer) -> None:
    """Trainable vs frozen parameters on this rank, and the optimizer state that costs (fp32 states:
    2 per trainable parameter for Adam(W), 1 for SGD momentum / RMSprop, 2 for RMSprop with momentum).
    Counts are of whole (tensor x pipeline rank) parameters, also under ZeRO-3 where ``p.numel()`` is
    that of a released, empty partition."""
    params = list(trainer.engine.module.parameters())
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    total = sum(_numel(p) for p in params)
    o = trainer.cfg.optim
    states = {"adamw": 2, "adam": 2, "sgd": 1 if o.momentum else 0, "rmsprop": 2 if o.momentum else 1}[o.name]
    record = {
        "step": trainer.state.step,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "optimizer_state_mib": trainable * states * 4 / 2**20,
        "optimizer_state_mib_full_finetuning": total * states * 4 / 2**20,
    }
    trainer.metrics.write(record, "params")
    if trainer.dist.is_main:
        console(
            f"parameters on rank 0: {trainable:,} trainable of {total:,} ({trainable / max(1, total):.2%}); "
            f"optimizer state {record['optimizer_state_mib']:.2f} MiB "
            f"(full fine-tuning: {record['optimizer_state_mib_full_finetuning']:.2f} MiB)"
        )


def _numel(param: torch.nn.Parameter) -> int:
    return getattr(param, "ds_numel", param.numel())  # ZeRO-3: the full parameter's size


def finetune_eval_hook(trainer: FinetuneTrainer, r: StepResult) -> None:
    cfg, step = trainer.cfg, trainer.state.step
    due = (cfg.train.eval_interval and step % cfg.train.eval_interval == 0) or step == cfg.train.steps
    if not due:
        return
    result = trainer.evaluate_all()
    if result is None:
        return
    trainer.metrics.write({"step": step, **result}, "valid")
    if trainer.metrics.tb is not None and "val_confusion" in result:
        trainer.metrics.tb.add_text(
            "valid/confusion", confusion_text(result["val_confusion"], cfg.finetune.labels), step
        )
    if trainer.dist.is_main:
        scalars = " ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        console(f"validation step {step}: {scalars}")
        if "val_confusion" in result:
            console(confusion_text(result["val_confusion"], cfg.finetune.labels))
    if trainer.stopper.update(step, result[cfg.finetune.metric]) and cfg.checkpoint.save:
        save_best(trainer, step, result)
    if trainer.stopper.should_stop and step < cfg.train.steps:
        if trainer.dist.is_main:
            console(
                f"early stopping at step {step}: {cfg.finetune.metric} has not improved for "
                f"{trainer.stopper.bad} validations (best {trainer.stopper.best:.4f} at step {trainer.stopper.best_step})"
            )
        trainer.metrics.write(
            {"step": step, "early_stopped": True, "best_step": trainer.stopper.best_step}, "valid"
        )
        cfg.train.steps = step  # the loop ends after this step's hooks; checkpoint_hook saves it as final


def confusion_text(confusion: list[list[int]], labels: list[str]) -> str:
    width = max(6, *(len(x) for x in labels))
    head = (
        " " * width
        + " | "
        + " ".join(f"{x:>{width}}" for x in labels)
        + "   (rows: true, columns: predicted)"
    )
    rows = [
        f"{labels[i]:>{width}} | " + " ".join(f"{n:>{width}}" for n in row) for i, row in enumerate(confusion)
    ]
    return "\n".join([head, *rows])


def save_best(trainer: FinetuneTrainer, step: int, result: dict[str, Any]) -> None:
    """``RUN_DIR/best``: weights (per tensor x pipeline rank, like a checkpoint's ``weights/``) and
    bigtrain.json of the best validation so far, so export and ``checkpoint.load`` accept it."""
    from safetensors.torch import save_file

    from bigtrain.checkpoint import fp32_master_weights

    cfg, dist = trainer.cfg, trainer.dist
    run_dir = Path(cfg.train.run_dir)
    tmp, final = run_dir / ".best.tmp", run_dir / "best"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "weights").mkdir(parents=True)
    torch.distributed.barrier()
    weights = fp32_master_weights(trainer.engine, cfg)  # a collective under ZeRO
    if dist.dp_rank == 0:
        save_file(weights, str(tmp / "weights" / f"tp{dist.tp_rank:02d}_pp{dist.pp_rank:02d}.safetensors"))
    torch.distributed.barrier()
    if dist.is_main:
        metric = cfg.finetune.metric
        meta = {
            "step": step,
            "consumed_samples": trainer.state.consumed_samples,
            "best": {"metric": metric, "value": result[metric]},
            "layout": {"tensor": cfg.parallel.tensor, "pipeline": cfg.parallel.pipeline},
            "config": cfg.to_dict(),
        }
        if trainer.chat_template is not None:
            meta["chat_template"] = trainer.chat_template
        (tmp / "bigtrain.json").write_text(json.dumps(meta, indent=2))
        from bigtrain.checkpoint_files import write_manifest

        write_manifest(tmp, {}, step)  # sizes and checksums of every file, as checkpoints carry
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        console(f"best {metric} {result[metric]:.4f} at step {step}: saved {final}")
    torch.distributed.barrier()
