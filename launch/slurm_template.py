"""The sbatch script bloom-slurm renders: @NAME@ fields are filled in by launch/slurm.py.

A Python string rather than a .sh file so that it ships with the package however it is installed.
"""

TEMPLATE = r'''#!/bin/bash
# BLOOM pretraining job, rendered by bloom-slurm; re-render it rather than editing it.
#   bloom-slurm @OVERRIDES@
@SBATCH@

# BigScience's tr11 launch: one srun task per node, each running torchrun over that node's
# processes, all meeting at the first node. --kill-on-bad-exit ends every node when one fails
# and --wait=@STEP_WAIT@ ends the step @STEP_WAIT@ s after the first task exits, so a crashed rank cannot
# leave the others waiting in a collective until the time limit (nor srun waiting for a lost node).
#
# Before the time limit SLURM sends SIGUSR1 (--signal) to the step's processes; torchrun passes it
# on to the workers (--signals-to-handle) and gives them --shutdown-timeout seconds to save a
# checkpoint and exit before it kills them. The trainer writes why it stopped to
# run_dir/exit.json; when that is the time limit's SIGUSR1 (or trainer.exit_duration_mins) and
# the job made progress, this script requeues the job (--requeue), which resumes from `latest`.
# A finished run, a kill switch, scancel's SIGTERM or an error is not requeued.
#
# A node lost (or one of its ranks stopped): its peers' collectives fail, at once when its
# processes' sockets close, else after parallel.collective_timeout_s; their heartbeats
# (parallelism/watchdog.py) name the silent hosts in exit.json, and if the job saved a checkpoint
# newer than the one this start resumed from, it is requeued without those hosts. When the first
# node (this script's) is the one lost, SLURM itself marks it down after SlurmdTimeout and
# requeues the job (NODE_FAIL with --requeue), also without it.
set -euo pipefail
cd @WORKDIR@

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-@PORT@}
PYTHON=@PYTHON@
RANK_LOGS=@RANK_LOGS@/ranks-$SLURM_JOB_ID
# srun from SLURM 22.05 on does not inherit the job's --cpus-per-task; this says it again.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
export MASTER_ADDR MASTER_PORT PYTHON RANK_LOGS
echo "bloom-slurm: job $SLURM_JOB_ID, $SLURM_NNODES node(s) x @NPROC@ process(es), rendezvous at $MASTER_ADDR:$MASTER_PORT (start $((${SLURM_RESTART_COUNT:-0} + 1)))"
rm -f @RUN_DIR@/exit.json  # left by an earlier start of this job: only this start's counts

# Requeue this job, leaving out the hosts in $1 ("a,b": where ranks went silent) besides those
# left out before. A running job's ExcNodeList cannot change, and the requeue ends this script
# (SIGTERM, then SIGKILL after KillWait): so the script ignores the SIGTERM and updates the job
# once it is pending again, before SLURM's hold on a requeued job lets it start.
requeue_without() {
    trap '' TERM
    scontrol requeue "$SLURM_JOB_ID"
    [ -n "$1" ] || return 0
    local before
    before=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'ExcNodeList=[^ ]*' | cut -d= -f2 || true)
    [ "$before" != "(null)" ] || before=""
    for _ in $(seq 50); do
        if scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="${before:+$before,}$1" 2>/dev/null; then
            echo "bloom-slurm: job $SLURM_JOB_ID requeued without $1"
            return 0
        fi
        sleep 0.1
    done
    echo "bloom-slurm: job $SLURM_JOB_ID requeued, but $1 could not be left out of its next start" >&2
}

# The single quotes matter: SLURM_PROCID differs per task, so the task's own shell expands it.
srun --wait=@STEP_WAIT@ --kill-on-bad-exit=1 bash -c 'exec "$PYTHON" -u -m torch.distributed.run \
    --nproc_per_node @NPROC@ --nnodes "$SLURM_NNODES" --node_rank "$SLURM_PROCID" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    --max_restarts 0 --tee 3 --log-dir "$RANK_LOGS" \
    --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout @SHUTDOWN@ \
    -m launch.train_cli "$@"' bloom-train @OVERRIDES@ && status=0 || status=$?
# torchrun itself exits non-zero after forwarding a signal, so the record decides, not $status.
if "$PYTHON" -m training.exit_record @RUN_DIR@ "$SLURM_JOB_ID"; then
    requeue_without "$("$PYTHON" -m training.exit_record --exclude @RUN_DIR@)"
fi
exit $status
'''
