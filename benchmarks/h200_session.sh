#!/usr/bin/env bash
# One device session's GPU work for issues 3, 4, 5 and 7, on a 2-GPU H200 machine, as two lanes that
# run side by side (one GPU each) so that every throughput figure is still measured alone on its GPU.
#
#   lane 0 (GPU 0): prep (SmolLM2 from its GGUF, the shared data) -> GaLore study trial (914 steps)
#                   -> wait for lane 1's QLoRA study trial -> `duetto report` of the study (issue 7)
#                   -> serve_bench.py on the two study models (issue 5)
#                   -> train_gpu.py: gemma-3-1b-it-shaped GaLore, SmolLM2 NF4 (issue 3)
#                   -> optional: the real `duetto sweep configs/sweep_study.yaml` search (RUN_SEARCH=1)
#   lane 1 (GPU 1): QLoRA int8 study trial (914 steps) -> train_gpu.py: gemma-3-1b-it-shaped QLoRA
#                   int8 and NF4 (issue 3) -> sweep_gpu.py: 4 trials sharing the GPU vs 1 alone (issue 4)
#
# Usage on the device (the lanes are detached with setsid, so they outlive the `run` call that starts
# them; later calls only look):
#   bash benchmarks/h200_session.sh start GGUF SHARED_DATA_DIR   # copies the tree, launches both lanes
#   bash benchmarks/h200_session.sh status                       # lane progress; packs $OUT/results.tgz
#
# Everything lands in $R (/tmp/results): logs/, study/ (the report), *.json benchmark figures.
set -u
SRC=/tmp/duetto-src W=/tmp/study R=/tmp/results M=/tmp/bench-models
TRAIN_STEPS=${TRAIN_STEPS:-100} SWEEP_STEPS=${SWEEP_STEPS:-150} SERVE_SECONDS=${SERVE_SECONDS:-20}
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# LLM.int8 and HF deprecation lines drown the progress lines; the filtered copy is what comes back.
NOISE='MatMul8bitLt|inputs will be cast|warnings.warn\(|FutureWarning|UserWarning|DeprecationWarning|gradient_checkpointing_enable|token.authentication|RAY_AUTH'

job() {  # job NAME CMD...: run one step of a lane, log it, never stop the lane on failure
  local name=$1; shift
  echo "== $(date +%T) start $name"
  "$@" >"$R/logs/$name.log" 2>&1
  local rc=$?
  echo "== $(date +%T) end $name rc=$rc"
  return $rc
}

gemma() {  # the gemma-3-1b-it architecture with random weights, built in this lane's own folder
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from gpu_models import gemma3_1b_random; \
print(gemma3_1b_random('$M/$1/gemma3-1b-random'))"
}

lane0() {
  export CUDA_VISIBLE_DEVICES=0
  job prep python3 benchmarks/study_gpu.py prep --gguf "$1" --shared "$2" --work $W
  touch $R/prep.done
  job study-galore python3 benchmarks/study_gpu.py train --methods galore --work $W
  while [ ! -e $R/study-qlora.done ]; do sleep 5; done
  job report python3 benchmarks/study_gpu.py report --work $W --out $R/study
  job serve-bench python3 benchmarks/serve_bench.py --generator $W/qlora_study --reranker $W/galore_study \
    --duration "$SERVE_SECONDS" --out $R/serve_bench_h200.json
  job gemma-lane0 gemma lane0
  job train-gemma-galore python3 benchmarks/train_gpu.py --data $W/data --steps "$TRAIN_STEPS" \
    --model gemma3-1b-random=$M/lane0/gemma3-1b-random --variants galore --work /tmp/bench0 \
    --out $R/train_gpu_gemma_galore.json
  job train-smollm2-nf4 python3 benchmarks/train_gpu.py --data $W/data --steps "$TRAIN_STEPS" \
    --model smollm2=$W/models/smollm2-135m-instruct --variants qlora-nf4 --work /tmp/bench0 \
    --out $R/train_gpu_smollm2_nf4.json
  if [ "${RUN_SEARCH:-0}" = 1 ]; then
    job sweep-search duetto sweep configs/sweep_study.yaml "base.model=$W/models/smollm2-135m-instruct" \
      "base.data.train=$W/data/train.jsonl" "base.data.test=$W/data/test.jsonl" storage_path=$R/sweeps
  fi
  echo "== lane0 done"
}

lane1() {
  export CUDA_VISIBLE_DEVICES=1
  while [ ! -e $R/prep.done ]; do sleep 2; done
  job study-qlora python3 benchmarks/study_gpu.py train --methods qlora --work $W
  touch $R/study-qlora.done
  job gemma-lane1 gemma lane1
  job train-gemma-qlora python3 benchmarks/train_gpu.py --data $W/data --steps "$TRAIN_STEPS" \
    --model gemma3-1b-random=$M/lane1/gemma3-1b-random --variants qlora-int8,qlora-nf4 --work /tmp/bench1 \
    --out $R/train_gpu_gemma_qlora.json
  job sweep-gpu python3 benchmarks/sweep_gpu.py --trials 4 --steps "$SWEEP_STEPS" \
    --model $W/models/smollm2-135m-instruct --data $W/data --out $R/sweep_gpu_h200.json
  echo "== lane1 done"
}

case "${1:-}" in
start)
  # Run from a private copy: later `run` calls re-sync the checkout under the running lanes.
  rm -rf $SRC && cp -a . $SRC && cd $SRC || exit 1
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
  mkdir -p $R/logs
  setsid nohup bash benchmarks/h200_session.sh lane0 "$2" "$(realpath "$3")" >$R/lane0.out 2>&1 </dev/null &
  setsid nohup bash benchmarks/h200_session.sh lane1 >$R/lane1.out 2>&1 </dev/null &
  echo "lanes started from $SRC"
  ;;
lane0) cd $SRC && lane0 "$2" "$3" ;;
lane1) cd $SRC && lane1 ;;
status)
  date +%T
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  for lane in lane0 lane1; do
    echo "---- $lane"; cat $R/$lane.out 2>/dev/null
    current=$(grep -o 'start [a-z0-9-]*' $R/$lane.out 2>/dev/null | tail -1 | cut -d' ' -f2)
    [ -n "$current" ] && grep -avE "$NOISE" "$R/logs/$current.log" | tail -n "${TAIL:-8}" | cut -c1-400
  done
  mkdir -p $R/logs-filtered
  for f in $R/logs/*.log; do grep -avE "$NOISE" "$f" | tail -c 400000 >"$R/logs-filtered/$(basename "$f")"; done
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results.tgz" -C / --exclude=tmp/results/logs --exclude=tmp/results/sweeps tmp/results
    ls -la "$OUT"
  fi
  ;;
*) echo "usage: $0 start GGUF SHARED_DIR | status" >&2; exit 2 ;;
esac
