#!/usr/bin/env bash
# One prepared check on a CUDA machine (see docs/BENCHMARKS.md): the trainer on CUDA with AMP
# (a teacher job, then a TID student distilled from it, both under torchrun), then the
# overhead benchmark (at 512 px with 20 paired rounds: GPU runs drift by more than the 5%
# target) and the data-loading share / per-GPU scaling of `bench/ddp.py`. `device_check.sh
# capacity` instead runs the capacity-gap accuracy protocol at 256 px for at most 9 minutes (a
# call of its own: a lent machine gives 10 minutes a command). Writes its logs and JSON figures
# to $OUT (or ./device-out).
set -euo pipefail
OUT=${OUT:-device-out}; mkdir -p "$OUT"
if [ -d .whl ]; then  # packages the device image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
W=/tmp/tid-check; rm -rf "$W"; mkdir -p "$W"
if [ "${1:-}" = capacity ]; then
  # its tuning stage (the teacher, the capacity check, then the trials in rounds, defaults
  # first); each finished run's record is in $OUT/capacity, the printout in capacity_tune.log
  timeout 540 python3 bench/accuracy.py --protocol capacity --stage tune --sizes gpu \
    --device cuda --jobs 3 --cache "$OUT/capacity" --out "$W/capacity" \
    --json "$OUT/capacity_tune.json" > "$OUT/capacity_tune.log" 2>&1 ||
    echo "capacity: exit $? (124: stopped at its 9 minutes)"
  tail -30 "$OUT/capacity_tune.log"
  exit 0
fi
python3 -m tid_core.data.synthetic --out "$W/data" --num-train 512 --num-val 64 --image-size 256 --seed 0
common='"dataset": {"path": "'$W'/data", "input_size": 256},
  "schedule": {"epochs": 3, "batch_size": 16, "optimizer": "adamw", "lr": 0.001, "weight_decay": 0.05,
               "warmup_iters": 20, "eval_every": 1, "log_every": 8, "amp": true},
  "resources": {"nproc_per_node": 1, "device": "cuda", "num_workers": 4}'
cat > "$W/teacher.json" <<JSON
{"name": "gpu-teacher", "student": {"arch": "fcos", "backbone": "resnet50", "fpn_channels": 256}, $common}
JSON
cat > "$W/tid.json" <<JSON
{"name": "gpu-tid", "student": {"arch": "fcos", "backbone": "resnet18", "fpn_channels": 128},
 "teacher": {"arch": "fcos", "backbone": "resnet50", "fpn_channels": 256,
             "weights": {"path": "$W/teacher/student.safetensors"}},
 "distill": {"method": "tid", "distill_warmup_iters": 20}, $common}
JSON
for job in teacher tid; do
  start=$(date +%s.%N)
  torchrun --standalone --nproc-per-node 1 -m tid_core.train --spec "$W/$job.json" --run-dir "$W/$job" \
    > "$OUT/train_$job.log" 2>&1 || { echo "$job FAILED"; tail -20 "$OUT/train_$job.log"; }
  echo "$job wall $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
  cp "$W/$job/events.jsonl" "$OUT/events_$job.jsonl"
  python3 - "$W/$job/events.jsonl" <<'PY'
import json, sys
ev = [json.loads(l) for l in open(sys.argv[1])]
s = ev[0]; print(" start:", {k: s[k] for k in ("device", "amp", "world_size", "total_steps")})
steps = [e for e in ev if e["type"] == "step"]
print(" step s/it:", round((steps[-1]["time"] - steps[0]["time"]) / max(1, steps[-1]["step"] - steps[0]["step"]), 4))
print(" last losses:", {k: round(v, 4) for k, v in steps[-1]["losses"].items()}, steps[-1]["stats"])
for e in ev:
    if e["type"] in ("eval", "error"):
        print(" ", e["type"], e.get("epoch"), e.get("message") or {k: e["metrics"][k] for k in ("AP", "AP50")})
print(" final:", ev[-1]["type"])
PY
done
python3 bench/overhead.py --device cuda --json "$OUT/overhead_128.json"
python3 bench/overhead.py --device cuda --image-size 512 --batch-size 16 --rounds 20 \
  --json "$OUT/overhead_512.json"
python3 bench/ddp.py --device cuda --json "$OUT/ddp_cuda.json"
