"""bigtrain.generation.single_process_config: a checkpoint trained at any layout is read by one process."""

from __future__ import annotations

from bigtrain.config import load_config
from bigtrain.generation import single_process_config
from tests.conftest import REPO


def test_single_process_config_drops_context_and_sequence_parallelism():
    """A checkpoint trained at tensor 2 x context 2 with sequence parallelism and ZeRO-1 (its saved
    config.yaml says so) resolves for one process: context and sequence parallelism change no weight,
    and were refused before (world size 1 vs context 2; sequence parallelism needs tensor > 1)."""
    overrides = ["parallel.tensor=2", "parallel.context=2", "parallel.sequence_parallel=true",
                 "model.num_kv_heads=4", "zero.stage=1", "activation_checkpointing=full"]  # fmt: skip
    saved = load_config(REPO / "configs" / "tiny.yaml", overrides).resolve(8).to_dict()
    cfg = single_process_config(saved)
    p = cfg.parallel
    assert (p.tensor, p.pipeline, p.context, p.sequence_parallel) == (1, 1, 1, False)
    assert cfg.derived.world_size == 1 and cfg.derived.data_parallel_size == 1
    assert cfg.zero.stage == 0 and cfg.activation_checkpointing == "none"
    assert cfg.model.num_kv_heads == 4 and cfg.model.seq_length == 32  # the model itself is kept


def test_single_process_config_reads_an_expert_parallel_checkpoint():
    """Weight files hold every expert, so a checkpoint trained at parallel.expert 2 (data parallel 2)
    is read by one process with every expert; the EP control flag goes with it."""
    moe = REPO / "configs" / "moe-tiny.yaml"
    saved = load_config(moe, ["parallel.expert=2", "debug.rotate_expert_ranks=true"]).resolve(2).to_dict()
    cfg = single_process_config(saved)
    assert cfg.parallel.expert == 1 and not cfg.debug.rotate_expert_ranks
    assert cfg.model.moe.num_experts == 4 and cfg.derived.world_size == 1
