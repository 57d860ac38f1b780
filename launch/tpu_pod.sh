#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM (a single host or a multi-host pod slice).
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
#
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/celeba64.py gs://my-bucket/runs/celeba64 \
#     --config.train.batch_size=512
#
# 1. Packs this checkout (tracked files, `git archive HEAD`, or the working tree with TARBALL_FROM=tree)
#    and copies it to every worker with `gcloud compute tpus tpu-vm scp --worker=all`.
# 2. On every worker at once (`gcloud compute tpus tpu-vm ssh --worker=all`): unpacks it, installs the
#    package with the [tpu] extra (jax[tpu], libtpu) and runs python -m patch_diffusion.main. JAX finds the
#    other workers itself (patch_diffusion.main calls jax.distributed.initialize() when TPU_WORKER_HOSTNAMES
#    lists more than one host).
#
# The workdir must be shared by all workers: a gs:// bucket path (Orbax writes checkpoints there
# directly) or a shared file system. Datasets: set --config.data.data_dir to a prepared TFDS directory
# that every worker can read (e.g. gs://my-bucket/tensorflow_datasets).
#
# Environment knobs:
#   PROJECT=...            gcloud project (default: gcloud's configured one)
#   REMOTE_DIR=...         where the code goes on the workers (default: patch_diffusion, in $HOME)
#   DETACH=1               run training under nohup (log in REMOTE_DIR/train_<worker>.log) and return at once;
#                          otherwise the ssh session streams the output and waits (Ctrl-C stops nothing)
#   SETUP='...'            extra shell commands run on every worker before installing (e.g. gcsfuse)
#   DRY_RUN=1              print the gcloud commands instead of running them
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
tpu="$1" zone="$2" config="$3" workdir="$4"
shift 4
remote_dir="${REMOTE_DIR:-patch_diffusion}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="$PROJECT")

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

quote_all() {  # shell-quotes each argument for the remote command line
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  echo "$out"
}

tmpdir="$(mktemp -d)"
trap 'rm -rf "$tmpdir"' EXIT
tarball="$tmpdir/patch_diffusion.tar.gz"
if [[ "${TARBALL_FROM:-git}" == tree ]]; then
  tar -C "$repo" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ -czf "$tarball" .
else
  git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
fi

train_cmd="python3 -m patch_diffusion.main --config=$(printf '%q' "$config") --workdir=$(printf '%q' "$workdir")$(quote_all "$@")"
remote="set -euo pipefail
${SETUP:-}
mkdir -p $remote_dir && tar -xzf ~/patch_diffusion.tar.gz -C $remote_dir && cd $remote_dir
python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tpu]'
worker=\$(hostname)"
if [[ "${DETACH:-0}" == 1 ]]; then
  remote+="
nohup $train_cmd > train_\$worker.log 2>&1 < /dev/null &
echo \"\$worker: training in the background, log \$PWD/train_\$worker.log\""
else
  remote+="
exec $train_cmd"
fi

run gcloud compute tpus tpu-vm scp "$tarball" "$tpu":~/patch_diffusion.tar.gz --worker=all --zone="$zone" \
  "${project_flag[@]}"
run gcloud compute tpus tpu-vm ssh "$tpu" --worker=all --zone="$zone" "${project_flag[@]}" --command="$remote"
