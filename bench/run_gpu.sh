#!/usr/bin/env bash
# The GPU tests and the benchmark suite on one GPU, in one go (about 12 minutes): gpt2-medium, bf16, random weights.
#   OUT=/some/dir bench/run_gpu.sh          (default OUT: bench/results/gpu; BUDGET_S: total seconds, 600;
#                                            STEPS: which steps, default pytest and all ten sub-commands)
# decode and throughput run in-process (torch + transformers; our engine's requests also need tiktoken), then
# interference, timeline-overhead, prefill and prefix, then longtail (in-process and over HTTP), http, poisson and scale if
# flask, gunicorn and tiktoken import. Each sub-command runs in its own process with a share of the time left: one
# that fails or runs out of time keeps the rows it already wrote (the JSON is rewritten after every row) and the
# next still runs. results.md and the plots are redrawn from the JSON at the end (`python -m bench report --out DIR`
# redraws them elsewhere if matplotlib is missing).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
PY="${PYTHON:-python3}"
end=$((SECONDS + ${BUDGET_S:-600}))
STEPS="${STEPS:-pytest decode throughput interference timeline-overhead prefill prefix longtail http poisson scale}"
mkdir -p "$OUT"
export TQDM_MININTERVAL=10  # progress lines every 10 s, not a log full of them
COMMON=(--model gpt2-medium --dtype bfloat16 --device cuda --full --out "$OUT")

log() { echo "== $*" | tee -a "$OUT/run_gpu.log"; }

step() {  # step COMMAND CAP_SECONDS FLAGS...: run one sub-command for at most CAP_SECONDS of the time left
  local command=$1 cap=$2
  shift 2
  case " $STEPS " in *" $command "*) ;; *) return ;; esac
  local left=$((end - SECONDS - 20))  # 20 s kept for the report
  [ "$left" -gt "$cap" ] && left=$cap
  if [ "$left" -lt 30 ]; then
    log "$command: skipped, no time left"
    return
  fi
  log "$command: at most ${left} s, started $(date -u +%H:%M:%S)"
  timeout -s INT -k 20 "$left" "$PY" -m bench "$command" "${COMMON[@]}" "$@" > "$OUT/$command.log" 2>&1
  local rc=$?
  grep -v "it/s]\|req/s]\|s/it]\|s/req]" "$OUT/$command.log" | tail -n 25
  log "$command: exit $rc after $((SECONDS)) s in all"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
"$PY" -c "import tiktoken" 2>/dev/null || log "tiktoken missing: our engine's rows will fail (the peers still run)"

case " $STEPS " in *" pytest "*)
  log "pytest: the GPU tests, started $(date -u +%H:%M:%S)"
  timeout 300 "$PY" -m pytest -q tests/test_triton_attention.py tests/test_fused_kernels.py tests/test_gpu.py tests/test_batch_invariant_gpu.py > "$OUT/pytest_gpu.txt" 2>&1
  log "pytest: exit $? ($(tail -n 1 "$OUT/pytest_gpu.txt"))" ;;
esac
step decode 90 --seconds 2
step throughput 330 --repeats 3 --peers hf_cb
step interference 60
step timeline-overhead 60
step prefill 60
step prefix 120 --peers ""  # the prefix cache on and off: shared, chat, burst, offline (no HF peer row)
if "$PY" -c "import flask, gunicorn, tiktoken" 2>/dev/null; then
  step longtail 150
  step http 250 --policies dynamic,static,nobatch --repeats 3  # dynamic first: the one the targets are about
  step poisson 200 --policies dynamic  # 1,000 long-tailed requests per rate, 50 to 300/s
  step scale 200  # one engine, then one per GPU (two sharing the card on a one-GPU machine)
else
  log "longtail, http, poisson, scale: skipped (flask, gunicorn or tiktoken missing)"
fi
"$PY" -m bench report --out "$OUT" || log "report failed"
log "done in ${SECONDS} s"
