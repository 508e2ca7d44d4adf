"""``python -m bigtrain.evaluate --config FILE --data PREFIX [--set ...]``: mean next-token loss and
perplexity of a checkpoint over contiguous, non-overlapping ``seq_length + 1``-token windows of a
dataset, in order. The bert family (``model.family: bert``): over the first ``data.train_samples``
(default 1024) pretraining samples of the (sentence-split) dataset, the MLM loss and masked-token accuracy over every predicted token, and the
NSP/SOP loss and accuracy over every sample (masks and pairs from ``train.seed``, as in training). Any
tensor/pipeline/data layout; weights come from ``checkpoint.load`` or the latest checkpoint of
``train.run_dir``. The last line printed is a JSON object.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F

from bigtrain.config import Config
from bigtrain.distributed import rank_from_env
from bigtrain.pretrain import config_or_exit, parse_args


def _window_batch(window: dict, device: torch.device, real: bool) -> dict[str, torch.Tensor]:
    tokens = torch.as_tensor(window["tokens"]).long().view(1, -1).to(device)
    labels = torch.as_tensor(window["labels"]).long().view(1, -1).to(device)
    mask = (
        torch.ones_like(tokens, dtype=torch.float32)
        if real
        else torch.zeros_like(tokens, dtype=torch.float32)
    )
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}


ENCODER_SAMPLES = 1024  # the bert family's samples evaluated unless data.train_samples says


def _encoder_sums(
    out: tuple[torch.Tensor, torch.Tensor], b: dict[str, torch.Tensor], tp: Any
) -> torch.Tensor:
    """[MLM loss sum, predicted tokens, correct ones, NSP loss sum, samples, correct ones] (fp64) of one
    micro-batch's outputs (MLM logits [s, b, v/tp], vocab-split over ``tp``; NSP logits [b, 2])."""
    from bigtrain.models.layers import cross_entropy

    mlm, nsp = out
    labels, mask = b["labels"].t(), b["loss_mask"].t().double()  # [s, b]
    losses = cross_entropy(mlm.clone(), labels.contiguous(), tp).double()  # a copy: megatron's overwrites
    # correct where the label's logit is the largest of the whole vocabulary (its slice is on one rank)
    top = mlm.max(-1).values  # [s, b]
    rows = mlm.shape[-1]
    local = labels - tp.rank * rows
    held = (local >= 0) & (local < rows)
    label_logit = torch.where(held, mlm.gather(-1, local.clamp(0, rows - 1)[..., None])[..., 0], 0.0)
    if tp.size > 1:
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=tp.group)
        torch.distributed.all_reduce(label_logit, group=tp.group)
    correct = (label_logit >= top).double() * mask
    nsp_labels = b["nsp_labels"].view(-1)
    weight = b["weight"].double()  # 0 for the padding samples of a last step
    nsp_loss = F.cross_entropy(nsp.double(), nsp_labels, reduction="none") * weight  # [b]
    return torch.stack(
        [
            (losses * mask).sum(),
            mask.sum(),
            correct.sum(),
            nsp_loss.sum(),
            weight.sum(),
            ((nsp.argmax(-1) == nsp_labels).double() * weight).sum(),
        ]
    )


@torch.no_grad()
def evaluate_encoder(cfg: Config, data_path: str) -> dict[str, float]:
    """The bert family's pretraining metrics over ``data.train_samples`` (default
    :data:`ENCODER_SAMPLES`) samples of ``data_path``, in order, one sample per data-parallel rank per
    step (so the layout never changes which samples count)."""
    from megatron.core import parallel_state

    from bigtrain import checkpoint
    from bigtrain.batch import BERT_BATCH
    from bigtrain.data import build_datasets
    from bigtrain.data.datasets import configured_tokenizer
    from bigtrain.data.sampler import collate
    from bigtrain.distributed import init_distributed, shutdown
    from bigtrain.models.parallelize import tensor_parallel
    from bigtrain.registry import build_model
    from bigtrain.step_runner import make_eval_runner, to_device

    cfg.train.micro_batch_size = 1
    cfg.train.global_batch_size = cfg.derived.data_parallel_size
    cfg.derived.grad_accum_steps = 1
    cfg.data.train, cfg.data.valid, cfg.data.split, cfg.data.mock = data_path, None, "100,0,0", False
    # megatron's masked dataset cannot build "one epoch" (its index builder needs a count)
    count = cfg.data.train_samples or ENCODER_SAMPLES
    source = weights_source(cfg)  # before any group, as the data
    samples, _ = build_datasets(cfg, configured_tokenizer(cfg), sizes=[count, 0, 0])
    dist = init_distributed(cfg)
    try:
        model = build_model(cfg, topology=dist.topology)
        checkpoint.load_weights_only(model, cfg, source)
        runner = make_eval_runner(cfg, model, dist, BERT_BATCH)
        tp = tensor_parallel(cfg)
        dp, n = cfg.derived.data_parallel_size, min(len(samples), count)  # megatron builds whole epochs
        sums = torch.zeros(6, dtype=torch.float64, device=dist.device)
        for step in range(math.ceil(n / dp)):
            index = step * dp + dist.dp_rank
            b = collate([samples[min(index, n - 1)]])
            b["weight"] = torch.tensor([float(index < n)])
            if index >= n:
                b["loss_mask"] = torch.zeros_like(b["loss_mask"])
            b = to_device(b, dist.device)
            out: Any = runner.outputs(b)
            here = torch.zeros(6, dtype=torch.float64, device=dist.device)
            if out is not None:  # the last pipeline stage
                here = _encoder_sums(out, b, tp)
            sums += runner.from_last_stage(here)
        if dp > 1:
            torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        mlm_loss, tokens, correct, nsp_loss, weight, nsp_correct = (float(x) for x in sums)
        result = {"mlm_loss": mlm_loss / max(tokens, 1), "mlm_accuracy": correct / max(tokens, 1)}
        if cfg.data.masking.sentence_pair != "none":  # nsp | sop: the head's task
            result |= {"nsp_loss": nsp_loss / max(weight, 1), "nsp_accuracy": nsp_correct / max(weight, 1)}
        return {**result, "samples": n, "predicted_tokens": int(tokens)}
    finally:
        shutdown()


def weights_source(cfg: Config) -> str:
    """The checkpoint evaluated (``checkpoint.load``, else ``train.run_dir``'s latest), checked against
    the config before any process group: ConfigError naming the fields whose shapes differ."""
    from bigtrain import checkpoint
    from bigtrain.config import ConfigError, config_from_dict

    source = cfg.checkpoint.load or str(checkpoint.checkpoints_dir(cfg))
    try:
        saved = config_from_dict(checkpoint.WeightReader(source).meta["config"]).model
    except (OSError, ValueError) as e:
        raise ConfigError(f"{source}: no readable checkpoint ({e})") from None
    diffs = checkpoint.model_shape_differences(saved, cfg.model)
    if diffs:
        raise ConfigError(f"{source}: the checkpoint's model differs from the config: " + "; ".join(diffs))
    return source


@torch.no_grad()
def evaluate(cfg: Config, data_path: str) -> dict[str, float]:
    """Mean loss over every window (each window's last seq_length tokens are predicted).

    Raises DataError (naming the file) for data training would refuse, before any process group exists.
    The bert family: :func:`evaluate_encoder`.
    """
    if cfg.model.family == "bert":
        return evaluate_encoder(cfg, data_path)
    from bigtrain import checkpoint
    from bigtrain.batch import LM_BATCH
    from bigtrain.data import SequentialWindows
    from bigtrain.distributed import init_distributed, shutdown
    from bigtrain.registry import build_model
    from bigtrain.step_runner import GlobalBatch, make_eval_runner

    # One window per data-parallel rank per step: the layout never changes which windows count.
    cfg.train.micro_batch_size = 1
    cfg.train.global_batch_size = cfg.derived.data_parallel_size
    cfg.derived.grad_accum_steps = 1
    # Before any process group: the checks training runs (ids within the vocabulary, an integer dtype
    # wide enough for it, and with data.tokenizer, data tokenized by that tokenizer).
    tok = None
    if cfg.data.tokenizer:
        from tokenizer import Tokenizer

        tok = Tokenizer.load(cfg.data.tokenizer)
    windows = SequentialWindows(data_path, cfg.model.seq_length, cfg.model.vocab_size, tok)
    source = weights_source(cfg)
    dist = init_distributed(cfg)
    try:
        model = build_model(cfg, topology=dist.topology)
        checkpoint.load_weights_only(model, cfg, source)
        runner = make_eval_runner(cfg, model, dist, LM_BATCH)
        dp, dp_rank = cfg.derived.data_parallel_size, dist.dp_rank
        n = len(windows)
        steps = math.ceil(n / dp)
        total = torch.zeros((), dtype=torch.float64)
        for step in range(steps):
            index = step * dp + dp_rank
            real = index < n
            batch = _window_batch(windows[min(index, n - 1)], dist.device, real)
            tokens = batch["loss_mask"].sum()
            # each window's own mean, a padding window (no trained token) counting 0; the whole window's
            # tokens, not the None default (a rank's own): context ranks each hold a chunk and their
            # losses are summed, which gave context x the mean
            normalizer = tokens.clamp(min=1).float()
            total += runner.run(GlobalBatch([batch], tokens, normalizer), train=False) * dp  # DP mean -> sum
        mean = float(total) / n
        return {"loss": mean, "perplexity": math.exp(mean), "windows": n, "tokens": n * cfg.model.seq_length}
    finally:
        shutdown()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    data = None
    if "--data" in argv:
        i = argv.index("--data")
        data = argv[i + 1] if i + 1 < len(argv) else None
        del argv[i : i + 2]
    if not data:
        print("bigtrain.evaluate: --data PREFIX is required", file=sys.stderr)
        sys.exit(2)
    cfg = config_or_exit(parse_args(argv, description=__doc__))
    from bigtrain.config import ConfigError
    from bigtrain.data import DataError

    try:
        result = evaluate(cfg, data)
    except DataError as e:
        print(f"bigtrain.evaluate: data error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except ConfigError as e:
        print(f"bigtrain.evaluate: config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if rank_from_env() == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
