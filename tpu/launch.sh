#!/usr/bin/env bash
# Run one pipeline command on this TPU VM, or on every worker of a pod slice.
#
# With TVQ_TPU_NAME unset the command runs here. With TVQ_TPU_NAME and TVQ_TPU_ZONE set,
# `gcloud compute tpus tpu-vm ssh --worker=all` runs it on each worker of that TPU, in the
# same folder and with the same PATH as here. Every worker therefore needs this
# repository, its virtual environment and the prepared data at the same paths. The
# output of all workers arrives on this command's stdout and stderr.
# Each worker's tvq runs with TVQ_DISTRIBUTED=auto, so the workers join one JAX job through
# jax.distributed.initialize(), which finds the slice's other workers itself; each reads
# only its rows of every batch, and process 0 writes the metrics and results.
set -euo pipefail

if [[ -z "${TVQ_TPU_NAME:-}" ]]; then
    exec "$@"
fi
if [[ -z "${TVQ_TPU_ZONE:-}" ]]; then
    echo "tpu/launch.sh: TVQ_TPU_ZONE is missing; set it to the zone of TPU ${TVQ_TPU_NAME}" >&2
    exit 2
fi

remote_command="cd $(printf '%q' "$PWD") && export PATH=$(printf '%q' "$PATH")"
remote_command+=" && export TVQ_DISTRIBUTED=auto"
remote_command+=" && $(printf '%q ' "$@")"
exec gcloud compute tpus tpu-vm ssh "$TVQ_TPU_NAME" --zone "$TVQ_TPU_ZONE" --worker=all \
    --command "$remote_command"
