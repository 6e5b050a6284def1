#!/usr/bin/env bash
# The GPU figures of benchmarks/results/ on a 2- or 4-GPU H200 machine: up to four lanes, each on its
# own GPU(s), run side by side, so that every throughput figure is still measured alone on its GPU.
# A lane is a list of the jobs below, run in order; a failed job is logged and the lane goes on.
#
#   prep          SmolLM2-135M-Instruct from its Q4_1 GGUF (bf16) + the three data files, split (seed 0)
#   study-galore  the study's GaLore trial (configs/galore_study.yaml, 914 steps)
#   study-qlora   the study's QLoRA int8 trial (configs/qlora_study.yaml, 914 steps)
#   report        `duetto report` of the study, once both study trials exist
#   serve-bench   serve_bench.py: random gemma-3-1b-it x2
#   serve-bench-study  serve_bench.py on the two study trials
#   train-gemma   train_gpu.py on the gemma-3-1b-it architecture, GEMMA_VARIANTS
#   train-smollm2-compile  train_gpu.py on SmolLM2, GaLore, plain and with compile=true
#   sweep-gpu     sweep_gpu.py: 4 trials sharing the GPU vs one alone, both methods
#   sweep-search  `duetto sweep configs/sweep_study.yaml` (ASHA search on SWEEP_GPUS, extra overrides
#                 SWEEP_SET), chosen on a validation split held out of train
#   wait-sweep    nothing: waits for sweep-search (for lanes whose GPU the sweep is using)
#   best-galore / best-qlora  full 2-epoch trials at the best settings sweep-search found, or, with
#                 SWEEP_FROM=DIR, those of a kept sweep folder (its best.json)
#   report-best   `duetto report` of those two trials
#   serve-bench-best  serve_bench.py on the two best-settings trials
#   gemma-prep    Gemma-3-270M from its GGUF at $GEMMA_GGUF (waits for $GEMMA_GGUF.ready)
#   gemma-study-galore / gemma-study-qlora / gemma-report  the study on Gemma-3-270M, on prep's split
#   demo          `duetto demo` on the GPU (model from prep's cache)
#   serve-colocate  serve_bench.py on SmolLM2's architecture at 32 clients: two deployments, then colocate: on
#   sweep-packing sweep_packing.py: the study sweep's QLoRA search unpacked and packed, beside plain HF
#   pack-phases   pack_phases.py: where a pack's time goes (joins, steps, interim reports, final
#                 evaluation), QLoRA and GaLore, 4 trials, 300 steps, a report every 50
#   decode-paths  decode_paths.py: the generator's static, dynamic and continuous-batching decoding
#   serve-buckets serve_bench.py at 32 clients: the default row buckets, then finer ones (4..128 by 16)
#   decode-load   decode_load.py: the generator under 1-64 clients, generate vs whole compiled steps vs
#                 continuous batching (no Serve)
#   serve-steps   serve_bench.py on SmolLM2's architecture with decoding.whole_steps: on
#   trial-speed   trial_speed.py on SmolLM2's shape: GaLore, QLoRA NF4 and int8 beside plain HF
#   trial-speed-gemma  the same on gemma-3-1b-it's shape (random weights), into trial_speed_gemma_h200.json
#
# Usage (lanes detach with setsid, so the starting command returns; poll with status):
#   bash benchmarks/h200_session.sh start SmolLM2-135M-Instruct.Q4_1.gguf DATA_DIR
#   LANE0="prep study-galore report" LANE1="study-qlora" bash benchmarks/h200_session.sh start GGUF DATA_DIR
#   TAIL=4 OUT=DIR bash benchmarks/h200_session.sh status     # also packs /tmp/results into DIR/results.tgz
# DATA_DIR holds alpaca_en_demo.json, tulu_v2_sample.jsonl and ultrachat_sample.jsonl. A lane other than
# lane 0 waits for prep. Without LANE0..LANE3 the plan below follows the GPU count. Durations on an H200:
# prep under a minute, sweep-search about 5 min on 4 GPUs, a best-settings trial 8-10 min, a report of
# two trials 4-12 min, a serve bench 4-5 min (benchmarks/README.md).
set -u
SRC=/tmp/duetto-src W=/tmp/study WG=/tmp/study-gemma R=/tmp/results M=/tmp/bench-models
GEMMA_GGUF=${GEMMA_GGUF:-/tmp/upload/gemma-3-270m-q4_k_m.gguf}
TRAIN_STEPS=${TRAIN_STEPS:-100} SWEEP_STEPS=${SWEEP_STEPS:-150} SERVE_SECONDS=${SERVE_SECONDS:-30}
GEMMA_VARIANTS=${GEMMA_VARIANTS:-qlora-int8,qlora-int8-noupcast}
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# LLM.int8 and HF deprecation lines drown the progress lines; the filtered copy is what comes back.
NOISE='MatMul8bitLt|inputs will be cast|warnings.warn\(|FutureWarning|UserWarning|DeprecationWarning|gradient_checkpointing_enable|token.authentication|RAY_AUTH'

job() {  # job NAME: run one step of a lane, log it, never stop the lane on failure
  local name=$1
  echo "== $(date +%T) start $name"
  "do_$name" >"$R/logs/$name.log" 2>&1
  local rc=$?
  echo "== $(date +%T) end $name rc=$rc"
  [ $rc = 0 ] && touch "$R/$name.done" || touch "$R/$name.failed"
}

wait_for() {  # a job of either lane; one that no lane runs would be waited for forever
  grep -qw -- "$1" $R/lanes || { echo "waits for $1, which no lane runs" >&2; return 1; }
  while [ ! -e "$R/$1.done" ] && [ ! -e "$R/$1.failed" ]; do sleep 3; done
}

do_prep() { python3 benchmarks/study_gpu.py prep --gguf "$GGUF" --shared "$SHARED" --work $W; }
keep_metrics() { cp "${2:-$W}/$1/metrics.json" "$R/metrics_${3:-}$1.json"; }  # comes back even if a report is cut off
do_study-galore() { python3 benchmarks/study_gpu.py train --methods galore --work $W && keep_metrics galore_study; }
do_study-qlora() { python3 benchmarks/study_gpu.py train --methods qlora --work $W && keep_metrics qlora_study; }
do_report() {
  wait_for study-galore; wait_for study-qlora
  python3 benchmarks/study_gpu.py report --work $W --out $R/study
}
do_serve-bench() {
  python3 benchmarks/serve_bench.py --duration "$SERVE_SECONDS" --out $R/serve_bench_gemma1b_h200.json
}
do_serve-bench-study() {
  wait_for study-galore; wait_for study-qlora
  python3 benchmarks/serve_bench.py --generator $W/qlora_study --reranker $W/galore_study \
    --duration "$SERVE_SECONDS" --out $R/serve_bench_smollm2_h200.json
}
do_train-gemma() {
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from gpu_models import gemma3_1b_random; \
gemma3_1b_random('$M/$LANE/gemma3-1b-random')" &&
  python3 benchmarks/train_gpu.py --data $W/data --steps "$TRAIN_STEPS" --variants "$GEMMA_VARIANTS" \
    --model gemma3-1b-random=$M/$LANE/gemma3-1b-random --work /tmp/bench-$LANE --out $R/train_gpu_gemma_$LANE.json
}
do_train-smollm2-compile() {
  python3 benchmarks/train_gpu.py --data $W/data --steps "$TRAIN_STEPS" --variants galore --compile \
    --model smollm2=$W/models/smollm2-135m-instruct --work /tmp/bench-$LANE --out $R/train_gpu_smollm2_compile.json
}
do_sweep-gpu() {
  python3 benchmarks/sweep_gpu.py --trials 4 --steps "$SWEEP_STEPS" --model $W/models/smollm2-135m-instruct \
    --data $W/data --out $R/sweep_gpu_h200.json
}
do_sweep-search() {  # on SWEEP_GPUS if set (then the lanes of those GPUs start with wait-sweep)
  CUDA_VISIBLE_DEVICES=${SWEEP_GPUS:-$CUDA_VISIBLE_DEVICES} duetto sweep configs/sweep_study.yaml \
    "base.model=$W/models/smollm2-135m-instruct" "base.data.train=$W/data/train.jsonl" \
    "base.data.test=$W/data/test.jsonl" storage_path=$R/sweeps ${SWEEP_SET:-} || return
  cp $R/sweeps/results.md $R/sweeps/results.csv $R/sweeps/best.json $R/  # the sweep folder itself stays there
}
do_wait-sweep() { wait_for sweep-search; }

do_demo() { DUETTO_CACHE=$W duetto demo --out /tmp/demo; }
do_best-galore() {
  [ -n "${SWEEP_FROM:-}" ] || wait_for sweep-search
  python3 benchmarks/study_gpu.py train --methods galore --work $W --from-sweep "${SWEEP_FROM:-$R/sweeps}" &&
    keep_metrics galore_best
}
do_best-qlora() {
  [ -n "${SWEEP_FROM:-}" ] || wait_for sweep-search
  python3 benchmarks/study_gpu.py train --methods qlora --work $W --from-sweep "${SWEEP_FROM:-$R/sweeps}" &&
    keep_metrics qlora_best
}
GEMMA=(--model gemma-3-270m --work $WG --data $W/data)  # the same split as SmolLM2's (made by prep)
do_gemma-prep() {
  while [ ! -e "$GEMMA_GGUF.ready" ]; do sleep 3; done
  python3 benchmarks/study_gpu.py prep "${GEMMA[@]}" --gguf "$GEMMA_GGUF"
}
do_gemma-study-galore() {
  wait_for gemma-prep
  python3 benchmarks/study_gpu.py train "${GEMMA[@]}" --methods galore && keep_metrics galore_study $WG gemma_
}
do_gemma-study-qlora() {
  wait_for gemma-prep
  python3 benchmarks/study_gpu.py train "${GEMMA[@]}" --methods qlora && keep_metrics qlora_study $WG gemma_
}
do_gemma-report() {
  wait_for gemma-study-galore; wait_for gemma-study-qlora
  python3 benchmarks/study_gpu.py report "${GEMMA[@]}" --out $R/study_gemma
}
do_report-best() {
  wait_for best-galore; wait_for best-qlora
  python3 benchmarks/study_gpu.py report --work $W --trials best --out $R/study_best
}
do_serve-bench-best() {
  wait_for best-galore; wait_for best-qlora
  python3 benchmarks/serve_bench.py --generator $W/qlora_best --reranker $W/galore_best \
    --duration "$SERVE_SECONDS" --out $R/serve_bench_smollm2_best_h200.json
}

do_serve-colocate() {  # the same load on both layouts, one after the other on this lane's GPU
  local args=(--model smollm2 --smollm2-dir $W/models/smollm2-135m-instruct --concurrency 32
              --duration "$SERVE_SECONDS" --naive-requests 2)
  python3 benchmarks/serve_bench.py "${args[@]}" --out $R/serve_c32_two_deployments_h200.json &&
    python3 benchmarks/serve_bench.py "${args[@]}" --colocate --out $R/serve_c32_colocated_h200.json
}
do_decode-paths() {
  (cd benchmarks && python3 decode_paths.py --smollm2-dir $W/models/smollm2-135m-instruct --out $R/decode_paths_h200.json)
}
do_serve-buckets() {
  local args=(--model smollm2 --smollm2-dir $W/models/smollm2-135m-instruct --concurrency 32
              --duration "$SERVE_SECONDS" --naive-requests 2)
  python3 benchmarks/serve_bench.py "${args[@]}" --out $R/serve_c32_default_buckets_h200.json &&
    python3 benchmarks/serve_bench.py "${args[@]}" --set 'decoding.row_buckets=[4,16,32,48,64,80,96,128]' \
      --out $R/serve_c32_finer_buckets_h200.json
}
do_decode-load() {
  (cd benchmarks && python3 decode_load.py --smollm2-dir $W/models/smollm2-135m-instruct --out $R/decode_load_h200.json)
}
do_serve-steps() {
  python3 benchmarks/serve_bench.py --model smollm2 --smollm2-dir $W/models/smollm2-135m-instruct \
    --duration "$SERVE_SECONDS" --naive-requests 2 --set decoding.whole_steps=on --out $R/serve_speed_whole_steps_h200.json
}
do_trial-speed() {
  python3 benchmarks/trial_speed.py --data $W/data --model smollm2=$W/models/smollm2-135m-instruct \
    --work /tmp/trial-speed-$LANE --out $R/trial_speed_h200.json
}
do_trial-speed-gemma() {  # its own file: a lane of its own on another GPU; merge the rows lists by hand
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from gpu_models import gemma3_1b_random; \
gemma3_1b_random('$M/$LANE/gemma3-1b-random')" &&
  python3 benchmarks/trial_speed.py --data $W/data --model gemma3-1b=$M/$LANE/gemma3-1b-random \
    --work /tmp/trial-speed-$LANE --out $R/trial_speed_gemma_h200.json
}
do_sweep-packing() {
  python3 benchmarks/sweep_packing.py --model $W/models/smollm2-135m-instruct --data $W/data \
    --work /tmp/sweep-packing-$LANE --out $R/sweep_packing_h200.json
}
do_pack-phases() {
  local args=(--model $W/models/smollm2-135m-instruct --data $W/data --steps 300 --every 50)
  python3 benchmarks/pack_phases.py "${args[@]}" --work /tmp/pack-phases-$LANE --out $R/pack_phases_h200.json &&
    python3 benchmarks/pack_phases.py "${args[@]}" --method galore --work /tmp/pack-phases-$LANE \
      --out $R/pack_phases_galore_h200.json
}

lane() {  # lane N JOB...: on GPU N
  LANE=lane$1; shift
  export CUDA_VISIBLE_DEVICES=${LANE#lane}
  echo "== $LANE on GPU $CUDA_VISIBLE_DEVICES: $*"
  [ "$LANE" = lane0 ] || wait_for prep
  for j in "$@"; do job "$j"; done
  echo "== $LANE done"
}

case "${1:-}" in
start)
  # Run from a private copy: later `run` calls re-sync the checkout under the running lanes.
  export GGUF=$(realpath "$2") SHARED=$(realpath "$3")
  for f in $R/lane*.pid; do [ -e "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && { echo "lanes still running" >&2; exit 1; }; done
  rm -rf $SRC && cp -a . $SRC && cd $SRC || exit 1
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
  mkdir -p $R/logs && rm -f $R/*.done $R/*.failed  # markers of an earlier start would release waiters
  # Default plan by GPU count: the best settings and the serve figures (the study-settings trials and
  # their report are the explicit lanes above). The sweep takes every GPU first (8 trials at once), then
  # the two best-settings trials train side by side and their report follows. The serve bench runs after
  # the sweep on a GPU of its own, next to two trainings only: launch-bound decoding slows several-fold
  # when a sweep and torch.compile share the CPUs, so the bench records the load average.
  # Only when no lane is given: a LANEn set by hand means the caller chose every lane.
  if [ -n "${LANE0:-}${LANE1:-}${LANE2:-}${LANE3:-}" ]; then
    :
  elif [ -n "${SWEEP_FROM:-}" ]; then
    # No sweep: the best settings of a kept sweep train at once. With 4 GPUs, Gemma-3-270M's study
    # fills GPUs 2 and 3 once its GGUF is in place ($GEMMA_GGUF.ready).
    LANE0="prep best-galore report-best" LANE1="best-qlora serve-bench"
    if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
      LANE2="gemma-prep gemma-study-galore gemma-report" LANE3="gemma-study-qlora"
    fi
  elif [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
    LANE0="prep sweep-search best-galore report-best" LANE1="wait-sweep best-qlora"
    LANE2="wait-sweep serve-bench serve-bench-best"
    export SWEEP_GPUS=${SWEEP_GPUS-0,1,2,3} SWEEP_SET=${SWEEP_SET-resources.gpus_per_trial=0.5}
  else
    LANE0="prep sweep-search best-galore report-best" LANE1="wait-sweep best-qlora serve-bench serve-bench-best"
    export SWEEP_GPUS=${SWEEP_GPUS-0,1}
  fi
  echo "${LANE0:-} ${LANE1:-} ${LANE2:-} ${LANE3:-}" >$R/lanes
  for n in 0 1 2 3; do
    jobs_var=LANE$n
    [ -n "${!jobs_var:-}" ] || continue
    setsid nohup bash benchmarks/h200_session.sh lane $n ${!jobs_var} >$R/lane$n.out 2>&1 </dev/null &
    echo $! >$R/lane$n.pid
  done
  echo "lanes started from $SRC: [${LANE0:-}] [${LANE1:-}] [${LANE2:-}] [${LANE3:-}]"
  ;;
lane) cd $SRC && shift && lane "$@" ;;
status)
  date +%T
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  for out in $R/lane*.out; do
    echo "---- $out"; cat "$out"
    current=$(grep -o 'start [a-z0-9-]*' "$out" | tail -1 | cut -d' ' -f2)
    [ -n "$current" ] && grep -avE "$NOISE" "$R/logs/$current.log" | tail -n "${TAIL:-8}" | cut -c1-400
  done
  mkdir -p $R/logs-filtered
  for f in $R/logs/*.log; do grep -avE "$NOISE" "$f" | tail -c 400000 >"$R/logs-filtered/$(basename "$f")"; done
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results.tgz" -C / --exclude=tmp/results/logs --exclude=tmp/results/sweeps tmp/results
    ls -la "$OUT"
  fi
  ;;
*) echo "usage: $0 start GGUF SHARED_DIR | status   (LANE0=/LANE1= job lists: see the header)" >&2; exit 2 ;;
esac
