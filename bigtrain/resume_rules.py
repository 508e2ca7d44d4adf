"""What a resumed run does with each config field that differs from the checkpoint's saved config.

Every leaf of the config tree (and the data-parallel size, which the world size sets) is in
:data:`RULES`, in one of three classes:

- ``free``: the change does not alter what a training step computes (logging, validation, checkpoint
  cadence, fault policies, communication tuning); it takes effect without a word.
- ``honoured``: the new value takes effect from the first resumed step and rank 0 says so in one line
  (``optim.lr: 0.001 → 0.0001 from step 3``). Where DeepSpeed's restored state would override it
  (LR schedule, optimizer hyper-parameters, gradient clipping, fp16 loss scaling), ``checkpoint.resume``
  puts the new value back after the load.
- ``refused``: the restored state cannot follow the change (model shape, layout, optimizer kind, data
  order, precision); pre-flight stops before any process group with one line naming the field, the
  saved and new values and the remedy.

:func:`reconcile` applies the table; ``tests/test_resume_rules.py`` fails when a config field is in no
class.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bigtrain.config import Config, ConfigError, Derived, MaskingConfig, RopeScalingConfig, config_from_dict

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

FREE, HONOURED, REFUSED = "free", "honoured", "refused"
DP_SIZE = "derived.data_parallel_size"


@dataclass(frozen=True)
class Rule:
    """How a resume treats a change of one field.

    ``kind`` applies when ``only_if(saved, new)`` holds (always when None), ``otherwise`` when it does
    not; ``value`` reads the compared value (default: the field itself), ``why`` is the reason shown in
    refusals and in the README table."""

    kind: str
    why: str
    only_if: Callable[[Config, Config], bool] | None = None
    otherwise: str = FREE
    value: Callable[[Config], Any] | None = None
    free_if: Callable[[Config, Config], bool] | None = None  # checked first: the change means nothing

    def kind_for(self, saved: Config, new: Config) -> str:
        if self.free_if is not None and self.free_if(saved, new):
            return FREE
        return self.kind if self.only_if is None or self.only_if(saved, new) else self.otherwise


def _partitioned(saved: Config, new: Config) -> bool:
    """The saved optimizer state is split over data-parallel ranks: ZeRO >= 1, and bf16/fp16 at ZeRO-0,
    which run as ZeRO-1 (``engine.deepspeed_config``)."""
    return saved.zero.stage >= 1 or saved.precision != "fp32"


def effective_stage(cfg: Config) -> int:
    """The ZeRO stage DeepSpeed runs: mixed precision at zero.stage 0 runs as 1 (engine.deepspeed_config)."""
    return cfg.zero.stage if cfg.precision == "fp32" or cfg.zero.stage else 1


def cannot_reshard(saved: Config) -> str | None:
    """Why the optimizer state a run with config ``saved`` wrote cannot be resharded, or None."""
    if saved.optim.name not in ("adamw", "adam"):
        return f"optim.name={saved.optim.name}: only Adam's state (its moments) is resharded"
    if effective_stage(saved) == 0 and saved.optim.layer_decay != 1.0:
        return (
            f"optim.layer_decay={saved.optim.layer_decay} at zero.stage 0: the saved optimizer groups carry no "
            "parameter names to rebuild them by"
        )
    if effective_stage(saved) == 0 and saved.parallel.pipeline > 1 and saved.model.family != "llama":
        if saved.model.tie_embeddings:
            return f"model.family={saved.model.family} with a tied head in a pipeline at zero.stage 0"
    return None


def _not_reshardable(saved: Config, new: Config) -> bool:
    """The saved optimizer state cannot follow a layout change (:func:`cannot_reshard`)."""
    return cannot_reshard(saved) is not None


def _both_fp16(saved: Config, new: Config) -> bool:
    return saved.precision == new.precision == "fp16"


def _optimizer_uses(*names: str) -> Callable[[Config, Config], bool]:
    return lambda saved, new: new.optim.name in names


def _valid_source_changes(saved: Config, new: Config) -> bool:
    return (saved.data.valid is None) != (new.data.valid is None)


def _pipelined(saved: Config, new: Config) -> bool:
    return new.parallel.pipeline > 1


SHAPE = "the checkpoint's weights have the saved shape"
LAYOUT = "the optimizer state is saved per tensor x pipeline rank"
RESHARD = (
    "the optimizer state is resharded to the new layout (bigtrain.reshard_inject) unless it cannot be: "
    "an optimizer other than Adam, layer decay at ZeRO-0"
)
SCHEDULE = "DeepSpeed restores the saved LR schedule; the new one is put in its place at the restored step"
GROUPS = "DeepSpeed restores the saved optimizer param_groups; the new value is set on them after the load"
BUILT = "not part of the restored state: the model/engine is built with the new value"
FAULT = "a fault or stop policy, not what a step computes"
TUNING = "communication or memory tuning: the same results"
LOGGING = "logging, validation or checkpoint cadence"
DATA = "the documents behind the saved data position (megatron's shuffle)"
SCALER = "DeepSpeed restores the saved loss scaler; the new value is set on it after the load"

RULES: dict[str, Rule] = {
    # model: the shape is what the weights are; numerics outside the weights are honoured
    "model.family": Rule(REFUSED, "the architecture the saved weights belong to"),
    "model.num_layers": Rule(REFUSED, SHAPE),
    "model.hidden_size": Rule(REFUSED, SHAPE),
    "model.num_attention_heads": Rule(REFUSED, SHAPE),
    "model.num_kv_heads": Rule(REFUSED, SHAPE, value=lambda c: c.model.kv_heads),
    "model.ffn_hidden_size": Rule(REFUSED, SHAPE, value=lambda c: c.model.ffn_size),
    "model.vocab_size": Rule(REFUSED, SHAPE),
    "model.tie_embeddings": Rule(REFUSED, SHAPE),
    "model.type_vocab_size": Rule(REFUSED, SHAPE),
    "model.make_vocab_size_divisible_by": Rule(
        REFUSED, RESHARD, only_if=_not_reshardable, otherwise=HONOURED
    ),
    "model.seq_length": Rule(
        REFUSED, "samples are windows of seq_length+1 tokens: the saved data position counts saved windows"
    ),
    "model.max_position_embeddings": Rule(HONOURED, BUILT),
    "model.init_std": Rule(
        REFUSED,
        "only the initial weights depend on it, and the resumed weights were drawn with the saved value",
    ),
    "model.rope_theta": Rule(HONOURED, BUILT),
    "model.kv_channels": Rule(REFUSED, SHAPE),
    "model.qkv_bias": Rule(REFUSED, SHAPE),
    "model.qk_norm": Rule(REFUSED, SHAPE),
    "model.hf_model_type": Rule(REFUSED, "the architecture the saved weights belong to"),
    "model.sliding_window": Rule(HONOURED, BUILT),
    "model.full_attention_layers": Rule(HONOURED, BUILT),
    "model.window_pattern": Rule(HONOURED, BUILT),
    "model.norm_offset": Rule(REFUSED, "it changes what the saved norm weights mean"),
    "model.sandwich_norms": Rule(REFUSED, SHAPE),
    "model.activation": Rule(REFUSED, "the saved MLP weights were trained with it"),
    "model.scale_embeddings": Rule(REFUSED, "the saved embeddings were trained with it"),
    "model.query_pre_attn_scalar": Rule(HONOURED, BUILT),
    "model.rope_local_theta": Rule(HONOURED, BUILT),
    "model.attn_logit_softcapping": Rule(HONOURED, BUILT),
    "model.final_logit_softcapping": Rule(HONOURED, BUILT),
    **{f"model.rope_scaling.{f.name}": Rule(HONOURED, BUILT) for f in dataclasses.fields(RopeScalingConfig)},
    "model.norm_eps": Rule(HONOURED, BUILT),
    # mixture of experts: which weights exist and their shapes; routing and the aux losses are built
    "model.moe.num_experts": Rule(REFUSED, SHAPE),
    "model.moe.ffn_hidden_size": Rule(REFUSED, SHAPE, value=lambda c: c.model.expert_ffn_size),
    "model.moe.layer_freq": Rule(REFUSED, SHAPE),
    "model.moe.shared_expert_ffn_size": Rule(REFUSED, SHAPE),
    "model.moe.shared_expert_gate": Rule(REFUSED, SHAPE),
    **{
        f"model.moe.{name}": Rule(HONOURED, BUILT)
        for name in ("top_k", "norm_topk_prob", "aux_loss_coeff", "z_loss_coeff", "capacity_factor")
    },
    # layout
    "parallel.tensor": Rule(REFUSED, RESHARD, only_if=_not_reshardable, otherwise=HONOURED),
    "parallel.pipeline": Rule(REFUSED, RESHARD, only_if=_not_reshardable, otherwise=HONOURED),
    "parallel.expert": Rule(
        REFUSED,
        "the optimizer state of the experts is saved per expert-parallel rank (DeepSpeed's expp_rank files, "
        "ZeRO shards over the expert-data-parallel group); it is not resharded to another expert-parallel size",
    ),
    "parallel.sequence_parallel": Rule(HONOURED, "it changes no weight: only how activations are split"),
    "parallel.context": Rule(
        REFUSED,
        RESHARD,
        only_if=lambda s, n: _partitioned(s, n) and _not_reshardable(s, n),
        otherwise=HONOURED,  # no weight changes; ZeRO's data x context partition is resharded
    ),
    "parallel.partition_method": Rule(
        REFUSED,
        RESHARD,
        only_if=_not_reshardable,
        otherwise=HONOURED,
        free_if=lambda s, n: not _pipelined(s, n),  # no pipeline now: no partition
    ),
    DP_SIZE: Rule(
        REFUSED,
        RESHARD,
        only_if=lambda s, n: _partitioned(s, n) and _not_reshardable(s, n),
        otherwise=HONOURED,  # resharded; ZeRO-0 fp32: every rank holds all of it; the data position is global
    ),
    "derived.world_size": Rule(FREE, "follows from the layout and the data-parallel size (classified there)"),
    "derived.grad_accum_steps": Rule(FREE, "follows from the batch sizes and the data-parallel size"),
    "derived.padded_vocab_size": Rule(FREE, "follows from model.vocab_size and parallel.tensor"),
    "zero.stage": Rule(REFUSED, RESHARD, only_if=_not_reshardable, otherwise=HONOURED),
    "zero.offload_optimizer": Rule(REFUSED, RESHARD, only_if=_not_reshardable, otherwise=HONOURED),
    "zero.overlap_comm": Rule(FREE, TUNING),
    "zero.reduce_bucket_size": Rule(FREE, TUNING),
    "zero.allgather_bucket_size": Rule(FREE, TUNING),
    "zero.stage3_param_persistence_threshold": Rule(FREE, TUNING),
    "zero.stage3_prefetch_bucket_size": Rule(FREE, TUNING),
    "zero.grad_reduce_dtype": Rule(HONOURED, BUILT),
    "activation_checkpointing": Rule(FREE, "recomputation: the same results"),
    "precision": Rule(REFUSED, "the optimizer (fp32 masters, loss scaler) and its checkpoint format"),
    # fp16 dynamic loss scaling: DeepSpeed pickles the whole scaler into the checkpoint
    "fp16.initial_scale_power": Rule(
        HONOURED,
        "the saved current scale is restored; a new value restarts the scale at 2**value",
        only_if=_both_fp16,
    ),
    "fp16.loss_scale_window": Rule(HONOURED, SCALER, only_if=_both_fp16),
    "fp16.hysteresis": Rule(HONOURED, SCALER, only_if=_both_fp16),
    "fp16.min_loss_scale": Rule(HONOURED, SCALER, only_if=_both_fp16),
    # optimizer and schedule
    "optim.name": Rule(REFUSED, "the optimizer's saved state (Adam moments, momentum buffers)"),
    "optim.layer_decay": Rule(REFUSED, "it splits the optimizer's saved parameter groups"),
    "optim.lr": Rule(HONOURED, SCHEDULE),
    "optim.min_lr": Rule(HONOURED, SCHEDULE),
    "optim.warmup_steps": Rule(HONOURED, SCHEDULE),
    "optim.decay": Rule(HONOURED, SCHEDULE),
    "optim.decay_steps": Rule(HONOURED, SCHEDULE),
    "optim.weight_decay": Rule(HONOURED, GROUPS),
    "optim.beta1": Rule(HONOURED, GROUPS, only_if=_optimizer_uses("adamw", "adam")),
    "optim.beta2": Rule(HONOURED, GROUPS, only_if=_optimizer_uses("adamw", "adam", "rmsprop")),
    "optim.eps": Rule(HONOURED, GROUPS, only_if=_optimizer_uses("adamw", "adam", "rmsprop")),
    "optim.momentum": Rule(HONOURED, GROUPS, only_if=_optimizer_uses("sgd", "rmsprop")),
    "optim.grad_clip": Rule(
        HONOURED, "DeepSpeed's ZeRO/bf16 optimizers restore the saved clip; the new one is set"
    ),
    # the loop
    "train.steps": Rule(
        HONOURED,
        "the run's length, and the LR decay length unless optim.decay_steps is set; the data order stays the "
        "saved run's: more samples than its data.train_samples are built only where megatron's order for "
        "them starts with the saved one (compared in pre-flight), else refused",
    ),
    "train.micro_batch_size": Rule(
        HONOURED, "gradient accumulation is recomputed; global batches are unchanged"
    ),
    "train.global_batch_size": Rule(
        HONOURED,
        "the data position is a sample count: the next global batch starts where the saved run stopped; "
        "more samples than the saved data.train_samples: as for train.steps",
    ),
    "train.seed": Rule(REFUSED, "megatron's shuffle of the data and the RNG streams restored on every rank"),
    "train.run_dir": Rule(FREE, "a copied run directory resumes like the original"),
    "train.log_interval": Rule(FREE, LOGGING),
    "train.eval_interval": Rule(FREE, LOGGING),
    "train.eval_steps": Rule(FREE, LOGGING),
    "train.dist_timeout_minutes": Rule(FREE, FAULT),
    "train.device": Rule(FREE, "checkpoints load on any device"),
    "train.compile": Rule(FREE, "compiled regions compute the same"),
    "train.exit_signal_save": Rule(FREE, FAULT),
    "train.max_minutes": Rule(FREE, FAULT),
    "train.nonfinite": Rule(FREE, FAULT),
    "train.max_consecutive_skips": Rule(FREE, FAULT),
    "train.spike_sigma": Rule(FREE, FAULT),
    "train.spike_window": Rule(FREE, FAULT),
    "train.spike_min_history": Rule(FREE, FAULT),
    "train.spike_rollback": Rule(FREE, FAULT),
    "train.max_rollbacks": Rule(FREE, FAULT),
    # data
    "data.train": Rule(REFUSED, DATA),
    "data.split": Rule(REFUSED, "which documents of data.train are training documents"),
    "data.valid": Rule(
        REFUSED,
        "without data.valid, data.split carves validation documents out of data.train",
        only_if=_valid_source_changes,
    ),
    "data.tokenizer": Rule(REFUSED, "the token ids the data and the model were built with"),
    "data.mock": Rule(REFUSED, DATA),
    **{
        f"data.masking.{f.name}": Rule(
            REFUSED, "every sample's masks and sentence pair follow from it (bert)"
        )
        for f in dataclasses.fields(MaskingConfig)
    },
    "data.document_mask": Rule(
        HONOURED,
        "attention and rotary positions per document from the first resumed step; the samples, their order "
        "and the weights' shapes do not depend on it",
    ),
    "data.cache_dir": Rule(FREE, "megatron's index maps are rebuilt identically wherever they are cached"),
    "data.train_samples": Rule(
        HONOURED,
        "megatron's shuffle is built for this many samples: unset, a resume keeps the saved run's count, or "
        "grows it to train.steps*global_batch_size where megatron's order for that starts with the saved "
        "run's whole order; a new value rebuilds the shuffle, and the relaunch says whether that order "
        "keeps the saved one",
    ),
    "checkpoint.load": Rule(
        REFUSED, "it is read only when train.run_dir has no checkpoint; a resume restores run_dir's newest"
    ),
    "checkpoint.interval": Rule(FREE, LOGGING),
    "checkpoint.keep_last": Rule(FREE, LOGGING),
    "checkpoint.save": Rule(FREE, LOGGING),
    "checkpoint.verify_checksums": Rule(FREE, LOGGING),
    "logging.tensorboard": Rule(FREE, LOGGING),
    "logging.peak_tflops": Rule(FREE, LOGGING),
    **{f"debug.{f.name}": Rule(FREE, "fault injection") for f in dataclasses.fields(Config().debug)},
    # fine-tuning
    "finetune.task": Rule(REFUSED, "the model head and the data"),
    "finetune.train": Rule(REFUSED, "the examples behind the saved data position"),
    "finetune.packing": Rule(REFUSED, "the training sequences behind the saved data position"),
    "finetune.overlong": Rule(REFUSED, "the training sequences behind the saved data position"),
    "finetune.labels": Rule(REFUSED, "the class ids of the saved score head"),
    "finetune.freeze_embeddings": Rule(REFUSED, "which parameters the saved optimizer state covers"),
    "finetune.freeze_layers": Rule(REFUSED, "which parameters the saved optimizer state covers"),
    "finetune.freeze_router": Rule(REFUSED, "which parameters the saved optimizer state covers"),
    "finetune.metric": Rule(REFUSED, "the restored best value and patience count are of the saved metric"),
    "finetune.lora.rank": Rule(REFUSED, SHAPE),
    "finetune.lora.targets": Rule(REFUSED, SHAPE),
    "finetune.valid": Rule(FREE, "validation only"),
    "finetune.strict": Rule(FREE, "only whether a bad input line stops the run"),
    "finetune.epochs": Rule(HONOURED, "it sets train.steps (see there); the epoch order is seeded per epoch"),
    "finetune.patience": Rule(
        HONOURED, "the restored count of validations without a gain meets the new value"
    ),
    "finetune.min_delta": Rule(HONOURED, "applies to the validations after the resume"),
    "finetune.lora.alpha": Rule(HONOURED, BUILT),
    "finetune.lora.dropout": Rule(HONOURED, BUILT),
}


def leaves(cfg: DataclassInstance, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a config (sub)tree by dotted name (``derived`` included), with its value."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(leaves(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def saved_config(meta: dict[str, Any]) -> Config:
    """The config a checkpoint's ``bigtrain.json`` records, with its derived values (world size, ...)."""
    saved = config_from_dict(meta["config"])
    derived = meta["config"].get("derived") or {}
    names = {f.name for f in dataclasses.fields(Derived)}
    saved.derived = Derived(**{k: v for k, v in derived.items() if k in names})
    return saved


def _get(cfg: Config, name: str) -> Any:
    rule = RULES[name]
    if rule.value is not None:
        return rule.value(cfg)
    node: Any = cfg
    for part in name.split("."):
        node = getattr(node, part)
    return node


def _show(value: Any) -> str:
    """A value as it is written in YAML or --set (null, true)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def train_samples_needed(cfg: Config, step: int, consumed: int) -> int:
    """Samples a pretraining run resumed at ``step``/``consumed`` reads by ``train.steps``."""
    return consumed + max(0, cfg.train.steps - step) * cfg.train.global_batch_size


OrderChange = Callable[[Config, int, int, int], "int | None"]
"""``(cfg, saved_count, new_count, n)``: the first of samples ``0..n-1`` that megatron's training order
built for ``new_count`` samples has differently from the one built for ``saved_count``, or None."""


def built_order_change(cfg: Config, saved: int, new: int, n: int) -> int | None:
    """:func:`bigtrain.data.datasets.train_order_change` on this process (both orders built here)."""
    from bigtrain.data.datasets import train_order_change

    return train_order_change(cfg, saved, new, n)


def reconcile(
    cfg: Config, meta: dict[str, Any], ckpt: str, order_change: OrderChange = built_order_change
) -> list[str]:
    """Compare ``cfg`` with the config saved in a checkpoint's metadata ``meta`` field by field.

    Raises ConfigError (one line) naming every refused field with the saved and new values and the
    remedy. Otherwise returns the honoured changes as lines for rank 0 (``optim.lr: 0.001 → 0.0001 from
    step 3``). Pretraining with ``data.train_samples`` unset gets the saved run's sample count, so
    megatron's shuffle (and ``config.yaml``) stay those of the saved run; when the relaunch needs more
    samples than that, ``order_change`` compares megatron's order for the new count with the saved one
    (every sample the saved run consumed or would have): the new count is honoured when they agree,
    refused when they do not."""
    from bigtrain.data import DataError
    from bigtrain.data.datasets import num_samples

    try:
        saved = saved_config(meta)
    except ConfigError as e:
        raise ConfigError(f"{ckpt}: its saved config does not load ({e})") from None
    step, consumed = int(meta["step"]), int(meta.get("consumed_samples", 0))
    pretraining = cfg.finetune.task == "none"
    user_samples = cfg.data.train_samples  # None: pretraining keeps the saved run's count (set here)
    if pretraining and user_samples is None:
        cfg.data.train_samples = num_samples(saved)[0]
    refused: list[str] = []
    honoured: list[str] = []
    said: dict[str, int] = {}  # config name -> its line in honoured
    data_refused, data_said = data_changes(cfg, meta, ckpt, step)
    for name, rule in RULES.items():
        before, after = _get(saved, name), _get(cfg, name)
        if name == "data.train_samples":
            before = num_samples(saved)[0] if pretraining else before
        if name in ("data.train", "data.valid"):
            if _resolved(before) == _resolved(after) or (name == "data.train" and _has_record(cfg, meta)):
                continue  # the same files by another path; or what data_changes compared
        if before == after:
            continue
        kind = rule.kind_for(saved, cfg)
        if kind == REFUSED:
            refused.append(_refusal(name, rule, saved, before, after, ckpt))
        elif kind == HONOURED:
            said[name] = len(honoured)
            honoured.append(f"{name}: {_show(before)} → {_show(after)} from step {step + 1}")
    refused += data_refused
    honoured += data_said
    if pretraining and not refused:
        needed = train_samples_needed(cfg, step, consumed)
        saved_count = num_samples(saved)[0]
        # the saved run's whole order: what it consumed or skipped, and what it would have read to its end
        whole = max(saved_count, consumed, *(int(end) for _, end in meta.get("skipped_batches") or []))

        def changed_at(new_count: int) -> int | None:
            try:
                return order_change(cfg, saved_count, new_count, min(whole, new_count))
            except DataError as e:
                raise ConfigError(str(e)) from None

        if user_samples is not None:
            if needed > user_samples:
                refused.append(_too_few_samples(cfg, needed))
            elif "data.train_samples" in said:
                first = changed_at(user_samples)
                honoured[said["data.train_samples"]] += (
                    f" (megatron's shuffle is rebuilt: a new data order from sample {first})"
                    if first is not None
                    else f" (data order of the saved run kept: its first {min(whole, user_samples)} "
                    "samples are unchanged)"
                )
        elif needed > saved_count:  # the saved run's count, kept so far
            # what the relaunch would build with data.train_samples unset, and at least what it reads
            unset = copy.copy(cfg)
            unset.data = copy.copy(cfg.data)
            unset.data.train_samples = None
            grown = max(needed, num_samples(unset)[0])
            first = changed_at(grown)
            if first is not None:
                refused.append(
                    _order_refusal(saved, cfg, needed, grown, saved_count, first, step, consumed, ckpt)
                )
            else:  # honoured: config.yaml and the next checkpoints record the new count
                cfg.data.train_samples = grown
                note = (
                    f" (data order of the saved run kept: its first {whole} samples are unchanged; "
                    f"data.train_samples {saved_count} → {grown})"
                )
                field = next((f for f in ("train.steps", "train.global_batch_size") if f in said), None)
                if field is None:
                    honoured.append(f"data.train_samples: {saved_count} → {grown} from step {step + 1}{note}")
                else:
                    honoured[said[field]] += note
        elif (saved.train.steps, saved.train.global_batch_size) != (
            cfg.train.steps,
            cfg.train.global_batch_size,
        ):
            honoured.append(f"data.train_samples: kept at {saved_count}, the saved run's data order")
    if refused:
        raise ConfigError(f"resuming from {ckpt}: " + "; ".join(refused))
    return honoured


def _resolved(spec: Any) -> Any:
    """``data.train``/``data.valid`` with every name as an absolute path (``data/w``, ``./data/w`` and
    ``/abs/data/w`` are one corpus); as given when it does not parse."""
    from bigtrain.data import DataError, parse_blend

    if spec is None:
        return None
    try:
        members = parse_blend(spec)
    except DataError:
        return spec
    return [(m.weight, [os.path.abspath(os.path.expanduser(n)) for n in m.names]) for m in members]


def _has_record(cfg: Config, meta: dict[str, Any]) -> bool:
    return not cfg.data.mock and (meta.get("data") or {}).get("data.train") is not None


def data_changes(cfg: Config, meta: dict[str, Any], ckpt: str, step: int) -> tuple[list[str], list[str]]:
    """(refusals, lines to say) from comparing the data files ``cfg`` names now with those the checkpoint
    recorded (``bigtrain.json``'s ``data``, :func:`bigtrain.data.validate.recorded_data`), shard by shard
    in blend order, on sizes and the ``PREFIX.meta.json`` digest (not mtimes: a copy changes them).
    ``data.train`` holding other content is refused; other content in ``data.valid`` only changes
    validation and is said. The same content under another path is accepted (said), except where no
    metadata file can tell. Checkpoints from before the record: accepted, said; mock data: nothing."""
    from bigtrain.data import DataError
    from bigtrain.data.validate import data_record

    if cfg.data.mock or cfg.data.train is None:
        return [], []
    recorded = meta.get("data")
    if recorded is None:
        return [], [
            f"data.train: not compared with the data the checkpoint was trained on ({ckpt} predates "
            "checkpoints recording their data's identity)"
        ]
    refused, said = [], []
    for name in ("data.train", "data.valid"):
        spec, before = getattr(cfg.data, name[5:]), recorded.get(name)
        if spec is None or before is None:
            continue
        try:
            now = data_record(spec, name)
        except (DataError, OSError):
            continue  # missing or unreadable: pre-flight's validation names the file
        problem, moved = _data_difference(before, now)
        if problem and name == "data.train":
            refused.append(
                f"data.train: {problem} ({DATA}); restore the files the checkpoint was trained on to resume, "
                f"or start a new train.run_dir from its weights with checkpoint.load={ckpt} (fresh optimizer, "
                "step 0)"
            )
        elif problem:
            said.append(f"data.valid: {problem}; validation from step {step + 1} uses the new files")
        elif moved:
            said.append(f"{name}: {moved} (the same files: sizes and preprocessing run equal)")
    return refused, said


_IDENTITY_FIELDS = (
    ("bin_size", ".bin bytes"),
    ("idx_size", ".idx bytes"),
    ("meta_sha256", "meta.json sha256"),
)


def _data_difference(before: list[dict], now: list[dict]) -> tuple[str | None, str | None]:
    """(what differs, or None; the moved prefixes, or None) between two :func:`data_record` values."""

    def names(record: list[dict]) -> str:
        return ", ".join(
            f"{m['weight']}:{p}" if m["weight"] is not None else p for m in record for p, _ in m["shards"]
        )

    if [(m["weight"], len(m["shards"])) for m in before] != [(m["weight"], len(m["shards"])) for m in now]:
        return f"the checkpoint was trained on {names(before)}, the config names {names(now)}", None
    moved = []
    pairs = [(b, n) for mb, mn in zip(before, now) for b, n in zip(mb["shards"], mn["shards"])]
    for (old_prefix, old), (prefix, new) in pairs:
        diffs = [
            f"{label} {_short(old.get(key))} → {_short(new.get(key))}"
            for key, label in _IDENTITY_FIELDS
            if old.get(key) != new.get(key)
        ]
        if diffs:
            return f"{prefix} is not the data the checkpoint was trained on ({', '.join(diffs)})", None
        if old_prefix != prefix:
            if old.get("meta_sha256") is None:
                return (
                    f"the checkpoint was trained on {old_prefix}, the config names {prefix} (no "
                    f"{prefix}.meta.json to tell whether they hold the same data)",
                    None,
                )
            moved.append(f"{old_prefix} → {prefix}")
    return None, ", ".join(moved) or None


def _short(value: Any) -> str:
    return "none" if value is None else value[:12] if isinstance(value, str) else str(value)


def check_chat_template(cfg: Config, meta: dict[str, Any], ckpt: str) -> None:
    """An SFT checkpoint records the chat template it was trained with (``chat_template`` in its
    metadata); resuming after the tokenizer directory's template changed would continue on a format the
    run did not start with (and mix two in one model): ConfigError naming the file and the remedy.
    Checkpoints without the record (pretraining, classification, older runs) are not compared."""
    from bigtrain.finetune.data import DataError, current_template, template_file

    recorded = meta.get("chat_template")
    if cfg.finetune.task != "sft" or not isinstance(recorded, dict) or not cfg.data.tokenizer:
        return
    try:
        now = current_template(cfg.data.tokenizer)
    except DataError as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if now == recorded.get("text"):
        return
    import hashlib

    where = template_file(cfg.data.tokenizer)
    current = f"sha256 {hashlib.sha256(now.encode('utf-8')).hexdigest()[:12]}" if now else "none"
    raise ConfigError(
        f"resuming from {ckpt}: the chat template in {where} ({current}) differs from the one the checkpoint "
        f"was trained with (sha256 {str(recorded.get('sha256'))[:12]}, from {recorded.get('source')}); "
        f"restore that template (python -m bigtrain.finetune.chat_template --tokenizer {cfg.data.tokenizer} "
        f"--template FILE with the text recorded under chat_template in {ckpt}/bigtrain.json), or start a "
        f"new train.run_dir with checkpoint.load={ckpt} to fine-tune on the new template"
    )


def _refusal(name: str, rule: Rule, saved: Config, before: Any, after: Any, ckpt: str) -> str:
    why = rule.why
    if why == RESHARD:  # say which case: the saved optimizer state cannot be resharded because ...
        why = f"the saved optimizer state cannot be resharded: {cannot_reshard(saved)}"
    rule = dataclasses.replace(rule, why=why)
    what = f"{name}: checkpoint {_show(before)} vs config {_show(after)} ({rule.why})"
    if name == DP_SIZE:
        return (
            f"data-parallel size: checkpoint {before} vs config {after} (world size {saved.derived.world_size} "
            f"saved, {rule.why}); relaunch with world size {saved.derived.world_size}, or start a new "
            f"train.run_dir from its weights with checkpoint.load={ckpt} (fresh optimizer, step 0)"
        )
    if name == "checkpoint.load":
        return f"{what}; drop the change to resume, or use a new train.run_dir to start from those weights"
    return (
        f"{what}; keep {name}={_show(before)} to resume, or start a new train.run_dir from its weights with "
        f"checkpoint.load={ckpt} (fresh optimizer, step 0)"
    )


def _too_few_samples(cfg: Config, needed: int) -> str:
    return (
        f"train.steps={cfg.train.steps} needs {needed} training samples but data.train_samples is "
        f"{cfg.data.train_samples}; raise data.train_samples to at least {needed} (megatron's shuffle is "
        "rebuilt for it: the relaunch says whether its order keeps the saved run's)"
    )


def _order_refusal(
    saved: Config,
    cfg: Config,
    needed: int,
    grown: int,
    kept: int,
    first: int,
    step: int,
    consumed: int,
    ckpt: str,
) -> str:
    t = cfg.train
    most = step + max(0, kept - consumed) // t.global_batch_size
    return (
        f"train.steps: checkpoint {saved.train.steps} vs config {t.steps} needs {needed} training samples, but "
        f"the saved run's data order (megatron's shuffle) was built for {kept} (data.train_samples unset: "
        f"train.steps*global_batch_size at its start), and megatron's order for {grown} samples differs "
        f"from it at sample {first} (it reshuffles when the number of epochs over the corpus changes), so "
        f"the batches after step {step} would not continue the saved run's order (repeating seen samples and "
        f"skipping others); keep train.steps <= {most}, or accept a new data order from step {step + 1} with "
        f"data.train_samples={grown}, or start a new train.run_dir with checkpoint.load={ckpt}. To extend "
        f"later without either, pin data.train_samples at a run's start"
    )
