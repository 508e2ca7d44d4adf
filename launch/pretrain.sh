#!/usr/bin/env bash
""":"
# bigtrain launcher, valid as both bash and Python.
#
#   deepspeed [launcher args] launch/pretrain.sh --config configs/tiny.yaml [--set key=value ...]
#       The DeepSpeed launcher starts `python launch/pretrain.sh --local_rank=N ...` on every rank;
#       the Python reading of this file re-executes it as bash, which lands below with RANK set.
#   bash launch/pretrain.sh --config ... [--set ...]
#       Starts the DeepSpeed launcher itself. Launcher arguments come from DS_LAUNCH_ARGS
#       (default: every visible GPU, or 1 CPU process), e.g.
#       DS_LAUNCH_ARGS="--hostfile launch/hostfile.example --num_nodes 2 --num_gpus 8" bash launch/pretrain.sh ...
#       SIGTERM/SIGUSR1 to this bash process make the local ranks save and exit 0 (exit status 0).
# BIGTRAIN_ENTRY selects the Python module (default bigtrain.pretrain).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
entry="${BIGTRAIN_ENTRY:-bigtrain.pretrain}"
python="${BIGTRAIN_PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${RANK:-}" || -n "${OMPI_COMM_WORLD_RANK:-}" ]]; then
    exec "$python" -u -m "$entry" "$@"
fi
if [[ -z "${DS_LAUNCH_ARGS:-}" ]]; then
    ngpu="$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
    DS_LAUNCH_ARGS="--num_gpus $(( ngpu > 0 ? ngpu : 1 ))"
fi
deepspeed_bin="$(dirname "$python")/deepspeed"
[[ -x "$deepspeed_bin" ]] || deepspeed_bin="deepspeed"
# Preemption: SIGTERM/SIGUSR1 to this script go to the local ranks themselves (each saves a checkpoint
# at the end of its step and exits 0), not to DeepSpeed's launcher, which would kill them.
pid_dir="$(mktemp -d)"
export BIGTRAIN_PID_DIR="$pid_dir"
forward() {
    echo "launch: received SIG$1: every rank saves a checkpoint at the end of its step and exits" >&2
    for f in "$pid_dir"/*.pid; do
        [[ -e "$f" ]] && kill -s "$1" "$(cat "$f")" 2>/dev/null || true
    done
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
# shellcheck disable=SC2086
"$deepspeed_bin" $DS_LAUNCH_ARGS "${BASH_SOURCE[0]}" "$@" &
launcher=$!
status=0
while kill -0 "$launcher" 2>/dev/null; do
    wait "$launcher" || true  # returns early (>128) when a trapped signal interrupts it
done
wait "$launcher" && status=0 || status=$?  # the launcher's own exit status
rm -rf "$pid_dir"
exit "$status"
":"""
# Python reading: hand over to the bash reading above, keeping this interpreter.
import os
import sys

os.environ.setdefault("BIGTRAIN_PYTHON", sys.executable)
os.execvp("bash", ["bash", os.path.abspath(__file__), *sys.argv[1:]])
