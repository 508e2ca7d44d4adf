"""Fine-tuning on the pretraining loop: the Trainer fed packed/classification batches
(``PACKED_BATCH``; the encoder's ``ENCODER_BATCH``), with hooks for validation over the whole validation
set (loss, and for classification accuracy, macro P/R/F1 and a confusion matrix; for token
classification token accuracy and entity-level P/R/F1, overall and per type), early stopping with
patience, the best checkpoint by a chosen metric, and the chat template recorded in every checkpoint."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bigtrain.batch import ENCODER_BATCH, PACKED_BATCH, BatchAdapter
from bigtrain.finetune.model import eval_stats
from bigtrain.hooks import Hook, Validation
from bigtrain.metrics import console, entity_scores
from bigtrain.models.layers import TensorParallel
from bigtrain.models.parallelize import tensor_parallel
from bigtrain.step_runner import StepRunner, data_parallel_sum, to_device
from bigtrain.trainer import StepResult, Trainer, TrainState

if TYPE_CHECKING:
    from bigtrain.config import Config
    from bigtrain.distributed import Dist

Batch = dict[str, torch.Tensor]
BEST = "best"  # RUN_DIR/best: the best validation's weights (see save_best)


def batch_adapter(cfg: Config) -> BatchAdapter:
    """What a fine-tuning micro-batch feeds the model: the decoder's packed (tokens, positions, doc_ids),
    the encoder's (tokens, token_types, attention_mask)."""
    return ENCODER_BATCH if cfg.model.family == "bert" else PACKED_BATCH


def token_metrics(preds: list[list[int]], labels: list[list[int]], tags: list[str]) -> dict[str, Any]:
    """Token classification: token accuracy over the trained tokens, entity-level precision/recall/F1
    over all entities (seqeval's micro average, default mode; see :func:`bigtrain.metrics.entity_scores`)
    and per entity type (``val_<TYPE>_precision`` ...). ``preds``/``labels``: tag ids per sequence."""
    pairs = [(p, y) for ps, ys in zip(preds, labels) for p, y in zip(ps, ys)]
    scores = entity_scores([[tags[y] for y in ys] for ys in labels], [[tags[p] for p in ps] for ps in preds])
    micro = scores.pop("micro")
    out: dict[str, Any] = {
        "val_accuracy": sum(p == y for p, y in pairs) / max(1, len(pairs)),
        "val_precision": micro["precision"],
        "val_recall": micro["recall"],
        "val_f1": micro["f1"],
        "val_entities": int(micro["support"]),
    }
    for kind, s in scores.items():
        out.update({f"val_{kind}_{name}": s[name] for name in ("precision", "recall", "f1")})
        out[f"val_{kind}_support"] = int(s["support"])
    return out


def classification_metrics(preds: list[int], labels: list[int], num_labels: int) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 (a class never predicted has precision 0, as sklearn's
    zero_division=0) and the confusion matrix (rows: true class, columns: predicted)."""
    confusion = [[0] * num_labels for _ in range(num_labels)]
    for pred, y in zip(preds, labels):
        confusion[y][pred] += 1
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

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]


class FinetuneValidation(Hook):
    """Validation over every validation item every ``train.eval_interval`` steps and at the last step,
    the best checkpoint (``RUN_DIR/best``) and early stopping. Its state (``early_stopping``: best
    value and step, validations without a gain) is saved with checkpoints, so a resumed run keeps its
    patience count."""

    state_key = "early_stopping"

    def __init__(self, cfg: Config, valid_items: list[Batch], chat_template: dict[str, Any] | None = None):
        f = cfg.finetune
        self.valid_items, self.chat_template = valid_items, chat_template
        self.stopper = EarlyStopping(f.metric, f.patience, f.min_delta)

    def state_dict(self) -> dict[str, Any]:
        return self.stopper.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stopper.load_state_dict(state)

    def resume_best(self, run_dir: Path, step: int, metric: str) -> None:
        """A resumed run's best so far from ``RUN_DIR/best`` (only replaced by a better one); a
        checkpoint's ``early_stopping`` state, loaded after this, takes precedence."""
        best = run_dir / BEST / "bigtrain.json"
        if step and best.is_file():
            saved = json.loads(best.read_text())
            if saved["best"]["metric"] == metric and saved["step"] <= step:
                self.stopper.best, self.stopper.best_step = saved["best"]["value"], saved["step"]

    def __call__(self, trainer: Trainer, r: StepResult) -> None:
        cfg, step, stopper = trainer.cfg, trainer.state.step, self.stopper
        if not trainer.due(cfg.train.eval_interval):
            return
        result = evaluate_all(trainer, self.valid_items)
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
        if stopper.update(step, result[cfg.finetune.metric]) and cfg.checkpoint.save:
            save_best(trainer, step, result, self.chat_template)
        if stopper.should_stop and step < cfg.train.steps:
            if trainer.dist.is_main:
                console(
                    f"early stopping at step {step}: {cfg.finetune.metric} has not improved for "
                    f"{stopper.bad} validations (best {stopper.best:.4f} at step {stopper.best_step})"
                )
            trainer.metrics.write(
                {"step": step, "early_stopped": True, "best_step": stopper.best_step}, "valid"
            )
            # the loop ends after this step's hooks; the checkpoint hook saves it as the final one
            trainer.request_stop(f"early stopping ({cfg.finetune.metric})", complete=True)


class ChatTemplateRecord(Hook):
    """SFT: the chat template trained with (``data.template_record``) in every checkpoint, which the
    export writes and a resume compares (``resume_rules.check_chat_template``)."""

    state_key = "chat_template"

    def __init__(self, template: dict[str, Any]):
        self.template = template

    def __call__(self, trainer: Trainer, r: StepResult) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return self.template


class FinetuneTrainer(Trainer):
    """The Trainer on fine-tuning batches, pretraining's validation replaced by
    :class:`FinetuneValidation`."""

    def __init__(
        self,
        cfg: Config,
        dist: Dist,
        engine: Any,
        make_train_batches: Callable[[int], Iterator[Batch]],
        make_valid_batches: Callable[[], Iterator[Batch]] | None = None,
        state: TrainState | None = None,
        *,
        hooks: list[Hook] | None = None,
        chat_template: dict[str, Any] | None = None,
    ):
        """As :class:`Trainer`, on fine-tuning batches (``PACKED_BATCH``). ``chat_template``: SFT's
        ``data.template_record``, recorded in checkpoints and the best."""
        super().__init__(
            cfg,
            dist,
            engine,
            make_train_batches,
            make_valid_batches,
            state,
            adapter=batch_adapter(cfg),
            hooks=hooks,
        )
        valid_items = list(self.make_valid_batches()) if self.make_valid_batches else []
        validation = FinetuneValidation(self.cfg, valid_items, chat_template)
        run_dir = Path(self.cfg.train.run_dir)
        if self.dist.is_main:  # a crash inside save_best may have left only RUN_DIR/best.old
            from bigtrain.checkpoint_files import recover_dir

            recover_dir(run_dir / BEST)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        validation.resume_best(run_dir, self.state.step, self.cfg.finetune.metric)
        self.hooks = [validation if isinstance(h, Validation) else h for h in self.hooks]
        if chat_template is not None:
            self.hooks.append(ChatTemplateRecord(chat_template))
        report_parameters(self)


def eval_micro_batch(runner: StepRunner, task: str, b: Batch, tp: TensorParallel) -> tuple:
    """(summed loss, summed weight, class predictions (as ``labels``: [b], token_classify [b, s]) or None)
    of one micro-batch on the device, the same on every rank: the stage with the outputs (under a
    pipeline only the last) computes ``eval_stats`` and the runner shares them (DeepSpeed's own eval loss
    is averaged per micro-batch and over data-parallel ranks, not weighted)."""
    out = runner.outputs(b)
    labels = b["labels"]
    stats = torch.zeros(2 + labels.numel(), dtype=torch.float64, device=labels.device)
    if out is not None:
        s, w, p = eval_stats(task, out, labels, b["loss_mask"], tp)
        stats[0], stats[1] = s, w
        if p is not None:
            stats[2:] = p.flatten()
    stats = runner.from_last_stage(stats)
    classes = task in ("classify", "token_classify")
    return stats[0], stats[1], stats[2:].long().view(labels.shape) if classes else None


@torch.no_grad()
def evaluate_all(trainer: Trainer, valid_items: list[Batch]) -> dict[str, Any] | None:
    """Validation over every item: token- (sft) or example-weighted (classify) loss, and metrics."""
    from megatron.core import parallel_state

    if not valid_items:
        return None
    task = trainer.cfg.finetune.task
    classify = task == "classify"
    tagging = task == "token_classify"
    tp = tensor_parallel(trainer.cfg)
    trainer.engine.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    weight = torch.zeros((), dtype=torch.float64)
    preds, labels = [], []
    try:
        for b in valid_items:
            b = to_device(b, trainer.dist.device)
            s, w, p = eval_micro_batch(trainer.runner, task, b, tp)
            loss_sum += float(s)
            weight += float(w)
            if classify:
                keep = b["loss_mask"] > 0
                preds += p[keep].tolist()
                labels += b["labels"][keep].tolist()
            elif tagging:  # each sequence's trained tokens (none: a filler)
                for row_p, row_y, row_m in zip(p, b["labels"], b["loss_mask"] > 0):
                    if row_m.any():
                        preds.append(row_p[row_m].tolist())
                        labels.append(row_y[row_m].tolist())
    finally:
        trainer.engine.train()
    totals = data_parallel_sum(torch.stack([loss_sum, weight]))  # context ranks: their chunks' sums
    dp_group = parallel_state.get_data_parallel_group()
    out: dict[str, Any] = {"val_loss": float(totals[0] / totals[1].clamp(min=1))}
    if classify or tagging:
        if parallel_state.get_data_parallel_world_size() > 1:
            gathered: list[Any] = [None] * parallel_state.get_data_parallel_world_size()
            torch.distributed.all_gather_object(gathered, (preds, labels), group=dp_group)
            preds = [p for g in gathered for p in g[0]]
            labels = [y for g in gathered for y in g[1]]
        if tagging:
            out.update(token_metrics(preds, labels, trainer.cfg.finetune.labels))
        else:
            out.update(classification_metrics(preds, labels, len(trainer.cfg.finetune.labels)))
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


def save_best(
    trainer: Trainer, step: int, result: dict[str, Any], chat_template: dict[str, Any] | None = None
) -> None:
    """``RUN_DIR/best``: weights (per tensor x pipeline rank, like a checkpoint's ``weights/``) and
    bigtrain.json of the best validation so far, so export and ``checkpoint.load`` accept it. Written to
    ``RUN_DIR/.best.tmp`` with a manifest, then swapped in by ``checkpoint_files.replace_dir``: a crash
    at any moment leaves the previous best or the new one (``best.old``, restored at start-up)."""
    from safetensors.torch import save_file

    from bigtrain.checkpoint import fp32_master_weights
    from bigtrain.checkpoint_files import replace_dir, write_manifest

    cfg, dist = trainer.cfg, trainer.dist
    run_dir = Path(cfg.train.run_dir)
    tmp, final = run_dir / f".{BEST}.tmp", run_dir / BEST
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "weights").mkdir(parents=True)
    torch.distributed.barrier()
    weights = fp32_master_weights(trainer.engine, cfg)  # a collective under ZeRO
    if dist.writes_weights:
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
        if chat_template is not None:
            meta["chat_template"] = chat_template
        (tmp / "bigtrain.json").write_text(json.dumps(meta, indent=2))
        write_manifest(tmp, {}, step)  # sizes and checksums of every file (fsync'ed), as checkpoints carry
        replace_dir(tmp, final)
        console(f"best {metric} {result[metric]:.4f} at step {step}: saved {final}")
    torch.distributed.barrier()
