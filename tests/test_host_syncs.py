"""No host synchronization of bigtrain's own inside a training step before DeepSpeed's.

On a GPU, reading a device value on the host (``.item()``, ``float(t)``, ``if t:``, ``.tolist()``) stalls
the CPU until the queue drains, so the next kernels launch late. DeepSpeed's optimizer step reads the
gradient norm on the host anyway (its non-finite check); bigtrain reads the loss and the norm only
after that, when the queue is already empty, and never in the model, the data path or the micro-batch
loop. Every tensor method that syncs is intercepted here (a ``TorchFunctionMode``) and attributed to the
first frame outside torch that called it."""

from __future__ import annotations

import traceback
from itertools import cycle

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.models.test_layout import tiny_cfg, world_of_one  # noqa: F401, F811  (fixture)

_T = torch.Tensor
HOST_READS = {_T.item, _T.tolist, _T.__bool__, _T.__float__, _T.__int__, _T.numpy, _T.cpu}
# bigtrain's reads after DeepSpeed's step: the step's loss (mean over data-parallel ranks) and grad norm
ALLOWED = {("bigtrain/step_runner.py", "_dp_mean"), ("bigtrain/trainer.py", "train_step")}


class HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, str]] = []  # (method, file, function)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            for frame in reversed(traceback.extract_stack()[:-1]):
                path = frame.filename.replace("\\", "/")
                if "/torch/" in path:
                    continue
                for root in ("site-packages/", "/bigtrain/"):
                    if root in path:
                        path = ("bigtrain/" if root == "/bigtrain/" else "") + path.rsplit(root, 1)[1]
                        break
                self.events.append((func.__name__, path, frame.name))
                break
        return func(*args, **(kwargs or {}))


def _trainer(cfg):
    from bigtrain.distributed import init_distributed
    from bigtrain.engine import initialize_engine
    from bigtrain.registry import build_model
    from bigtrain.trainer import Trainer

    dist = init_distributed(cfg)
    engine = initialize_engine(cfg, build_model(cfg, topology=dist.topology), dist)
    g = torch.Generator().manual_seed(0)
    m, b = cfg.model, cfg.train.micro_batch_size
    tokens = torch.randint(0, m.vocab_size, (b, m.seq_length + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(b, m.seq_length)}
    trainer = Trainer(cfg, dist, engine, lambda consumed: cycle([batch]))
    trainer.metrics.close()
    return trainer


@pytest.mark.parametrize(
    "overrides",
    [["precision=bf16"], ["zero.stage=1"], ["zero.stage=3"]],
    ids=["bf16-optimizer", "fp32-zero1", "fp32-zero3"],
)
def test_no_bigtrain_host_sync_before_deepspeeds_own(world_of_one, tmp_path, overrides):  # noqa: F811
    cfg = tiny_cfg(*overrides, f"train.run_dir={tmp_path}", "logging.tensorboard=false")
    assert cfg.derived.grad_accum_steps == 4  # the micro-batch loop is exercised
    trainer = _trainer(cfg)
    trainer.train_step()  # warm-up (first-step allocations)
    reads = HostReads()
    with reads:
        result = trainer.train_step()
    assert result.applied and result.loss > 0
    origins = [path for _, path, _ in reads.events]
    assert any(p.startswith("deepspeed/") for p in origins), (
        f"DeepSpeed's step no longer reads the device on the host: bigtrain's own reads now stall the "
        f"GPU queue and should move to the log interval. Reads: {reads.events}"
    )
    first_deepspeed = next(i for i, p in enumerate(origins) if p.startswith("deepspeed/"))
    ours = [(i, e) for i, e in enumerate(reads.events) if e[1].startswith("bigtrain/")]
    assert ours, "the loss must be read once per step"
    for i, (method, path, function) in ours:
        assert (path, function) in ALLOWED, f"unexpected host read {method} in {path}:{function}"
        assert i > first_deepspeed, f"{path}:{function} reads the device before DeepSpeed's step does"
