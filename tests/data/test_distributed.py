"""Two ranks in a gloo group build the same datasets (rank 0 first) and read disjoint halves of each batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bigtrain.data import build_datasets
from tests.conftest import REPO, cpu_env, free_port
from tests.data.dist_worker import GBS, STEPS, blend_cfg
from tests.data.util import blend_corpora


@pytest.mark.timeout(240)
def test_two_gloo_ranks_share_datasets_and_split_batches(tmp_path):
    blend_corpora(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = cpu_env(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
        )
        cmd = [sys.executable, "-m", "tests.data.dist_worker", str(tmp_path), str(out)]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-6000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))

    assert r0["len"] == r1["len"] and r0["valid_len"] == r1["valid_len"]
    reference, _ = build_datasets(blend_cfg(str(tmp_path)))  # single process, same cache directory
    assert len(reference) == r0["len"]
    for k in range(STEPS):
        a, b = r0["steps"][k], r1["steps"][k]
        assert not set(a["ids"]) & set(b["ids"])
        assert a["ids"] + b["ids"] == list(range(k * GBS, (k + 1) * GBS))
        assert a["tokens"] + b["tokens"] == [reference[i]["tokens"].tolist() for i in a["ids"] + b["ids"]]
    assert r0["error"] and r0["error"] == r1["error"] and "does_not_exist" in r0["error"]
    assert r0["shared"] == r1["shared"] == "rank 0 found bad.bin"
    assert r0["calls"] == [0] and r1["calls"] == []
