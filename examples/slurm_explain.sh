#!/usr/bin/env bash
# Explain a cohort on a SLURM cluster: a job array with one GPU per task, each task explaining one part
# of the cases (`nnxai explain -num_parts N -part_id i`, split as nnUNetv2_predict splits), then one
# small job, started when every task has ended, that runs `nnxai merge OUT` (cohort tables, list of
# missing and half-written cases).
#
# Submit from a login node:
#   PARTS=8 examples/slurm_explain.sh IMAGES OUT -m MODEL_FOLDER [other nnxai explain options]
#   PARTS=8 examples/slurm_explain.sh IMAGES OUT -d 901 -tr nnUNetTrainerWML -f 0 --gt LABELS
#
# Environment:
#   PARTS        number of array tasks (default 4)
#   MAX_RUNNING  at most this many tasks at once (optional)
#   NNXAI        the command that runs nnxai (default `nnxai`), for example
#                "apptainer exec --nv --bind /data nnxai.sif nnxai"
# Logs: OUT/slurm_logs/. Adapt the #SBATCH lines below (partition, account, time) to your cluster.
# Submitting the same command again redoes only the cases that are still missing. Always resubmit
# the whole array: each task's part depends on the number of tasks.
#
#SBATCH --job-name=nnxai-explain
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=24:00:00
set -euo pipefail

usage="usage: [PARTS=N] $0 IMAGES OUT (-m MODEL_FOLDER | -d DATASET ...) [nnxai explain options]"
if [[ $# -lt 2 ]]; then
    echo "$usage" >&2
    exit 2
fi
images=$1
out=$2
shift 2
read -r -a nnxai <<<"${NNXAI:-nnxai}"

if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    # Submission: the array of explain tasks, then the merge job that waits for all of them.
    parts=${PARTS:-4}
    if ! [[ $parts =~ ^[1-9][0-9]*$ ]]; then
        echo "PARTS must be a positive whole number, got '$parts'" >&2
        exit 2
    fi
    if ! command -v sbatch >/dev/null 2>&1; then
        echo "sbatch not found: submit from a SLURM login node" >&2
        exit 2
    fi
    if [[ ! -d $images ]]; then
        echo "$images: no such input folder" >&2
        exit 2
    fi
    images=$(cd "$images" && pwd)
    mkdir -p "$out/slurm_logs"
    out=$(cd "$out" && pwd)
    array="0-$((parts - 1))${MAX_RUNNING:+%$MAX_RUNNING}"
    array_job=$(sbatch --parsable --array="$array" --output="$out/slurm_logs/explain_%A_%a.log" \
        "$0" "$images" "$out" "$@")
    array_job=${array_job%%;*}
    merge_command=$(printf '%q ' "${nnxai[@]}" merge "$out")
    merge_job=$(sbatch --parsable --dependency="afterany:$array_job" --job-name=nnxai-merge --ntasks=1 \
        --cpus-per-task=1 --mem=4G --time=01:00:00 --output="$out/slurm_logs/merge_%j.log" \
        --wrap="$merge_command")
    echo "submitted explain array $array_job ($parts tasks) and merge job ${merge_job%%;*}; logs in $out/slurm_logs"
    exit 0
fi

# One array task. Parts are numbered by array index, so the array must be exactly 0..N-1.
count=${SLURM_ARRAY_TASK_COUNT:?not set: run this as a SLURM job array}
if [[ ${SLURM_ARRAY_TASK_MIN:-0} != 0 || ${SLURM_ARRAY_TASK_MAX:-$((count - 1))} != $((count - 1)) ]]; then
    echo "array ${SLURM_ARRAY_TASK_MIN:-?}-${SLURM_ARRAY_TASK_MAX:-?} with $count tasks: submit the whole array 0-N" >&2
    exit 2
fi
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
exec "${nnxai[@]}" explain -i "$images" -o "$out" -device cuda \
    -num_parts "$SLURM_ARRAY_TASK_COUNT" -part_id "$SLURM_ARRAY_TASK_ID" "$@"
