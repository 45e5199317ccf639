#!/bin/sh
# The `train` compose service: download and verify Galaxy10 DECaLS, train, evaluate on the
# held-out test split, export ONNX and publish it as the model `serve` loads.
# Arguments are passed on to `galmorph train`, e.g.
#   docker compose --profile train run --rm train --set epochs=50
set -eu

data_dir=${GALMORPH_DATA_DIR:-/data}
runs_dir=${GALMORPH_RUNS_DIR:-/runs}
models_dir=${GALMORPH_MODELS_DIR:-/models}
model=${GALMORPH_TRAIN_MODEL:-astroformer_4}
run_name=${GALMORPH_RUN_NAME:-$model-$(date -u +%Y%m%dT%H%M%SZ)}
data_file=$data_dir/Galaxy10_DECals.h5
run_dir=$runs_dir/$run_name
published=$models_dir/model.onnx
# On the models volume itself, so the final rename is atomic: serve never sees half a file.
staging=$models_dir/.staging-$run_name.onnx

log() { printf '[galmorph-train] %s\n' "$*" >&2; }

log "1/4 data: downloading or verifying $data_file"
galmorph data download --out "$data_dir"
log "2/4 train: $model -> $run_dir"
galmorph train --data "$data_file" --model "$model" --out "$run_dir" "$@"
log "3/4 evaluate: $run_dir on the test split"
galmorph evaluate "$run_dir" --data "$data_file" --split test
log "4/4 export: $run_dir -> $published"
# The parity check (onnxruntime against PyTorch) runs on real Galaxy10 images.
galmorph export "$run_dir" --out "$staging" --parity-data "$data_file"
mv -f "$staging" "$published"
# serve polls for a missing model (GALMORPH_WAIT_FOR_MODEL in its image); a model it already
# serves is only replaced by a new process.
log "published $published; a serve still waiting for a model loads it within seconds, one serving an older model on: docker compose restart serve"
