#!/usr/bin/env bash
# End to end on one GPU: EXL2 teacher dump -> scripts/train.py with the CUDA kernel -> kdengine eval gsm8k
# of the student (hf backend) and of the EXL2 teacher; tokens/s of each stage in a table printed last.
#
# Prerequisites: a CUDA machine with kdengine's extension built in place (scripts/gpu_check_kernel.sh
# build) and exllamav2 importable; `scripts/gpu_check_exl2.py --stages build,hf,convert` has filled
# WORK with WORK/hf (the fp16 HF model) and WORK/exl2-8.0 (its EXL2 quantization).
#
#   WORK=/tmp/kd/w TRAIN_DATA=gsm8k-train.jsonl TEST_DATA=gsm8k-test.jsonl OUT=/tmp/e2e bash scripts/gpu_e2e.sh
#
# Knobs (env): BPW (8.0), STEPS (300), LAYERS (10), EVAL_N (64), TEACHER_EVAL_N (16), MAX_NEW (256);
# TEACHER/BACKEND/STUDENT_FROM/DEVICE/DTYPE replace the EXL2 teacher, the student's source and the device
# (e.g. BACKEND=hf DEVICE=cpu DTYPE=fp32 to try the pipeline on a small model without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
work="${WORK:?set WORK to the --work dir of gpu_check_exl2.py}"
train="${TRAIN_DATA:?set TRAIN_DATA (question/answer JSONL)}"
test="${TEST_DATA:?set TEST_DATA (GSM8K JSONL)}"
out="${OUT:-$work/e2e-results}"
bpw="${BPW:-8.0}"
teacher="${TEACHER:-$work/exl2-$bpw}" backend="${BACKEND:-exl2}" student_from="${STUDENT_FROM:-$work/hf}"
device="${DEVICE:-cuda}" dtype="${DTYPE:-bf16}"
steps="${STEPS:-300}" layers="${LAYERS:-10}"
eval_n="${EVAL_N:-64}" teacher_eval_n="${TEACHER_EVAL_N:-16}" max_new="${MAX_NEW:-256}"
python="${PYTHON:-python3}"
e2e="$work/e2e"
rm -rf "$e2e"
mkdir -p "$e2e" "$out"

stage() {  # stage NAME COMMAND... : runs it, logs to $out/NAME.log, records wall seconds
  local name=$1 start
  shift
  echo "== $name: $*"
  start=$(date +%s)
  "$@" >"$out/$name.log" 2>&1 || { echo "stage $name failed:"; tail -n 30 "$out/$name.log"; exit 1; }
  echo "$name $(($(date +%s) - start))" >>"$e2e/walls"
  tail -n 3 "$out/$name.log"
}

teacher_device=(--device "$device")
[ "$backend" = hf ] && teacher_device+=(--dtype "$dtype")
stage dump "$python" -m kdengine dump --backend "$backend" --teacher "$teacher" --data "$train" \
  --out "$e2e/store" --top-k 64 --chat --max-length 512 --batch-size 32 "${teacher_device[@]}"
stage make_student "$python" -m kdengine make-student --teacher "$student_from" --layers "$layers" --out "$e2e/student"
stage train "$python" scripts/train.py --student "$e2e/student" --store "$e2e/store" --out "$e2e/run" \
  --steps "$steps" --lr 3e-4 --batch-tokens 32768 --log-every 20 --eval-every 100 --save-every "$steps" --workers 4
stage eval_student "$python" -m kdengine eval gsm8k --model "$e2e/run/final" --data "$test" --limit "$eval_n" \
  --chat --batch-size "$eval_n" --max-new-tokens "$max_new" --device "$device" --dtype "$dtype" --log-dir "$e2e/eval-student"
stage eval_teacher "$python" -m kdengine eval gsm8k --model "$teacher" --backend "$backend" --data "$test" \
  --limit "$teacher_eval_n" --chat --max-new-tokens "$max_new" "${teacher_device[@]}" --log-dir "$e2e/eval-teacher"

"$python" - "$e2e" "$out" "$backend" "$dtype" <<'EOF'
import json, sys
from pathlib import Path

import torch

e2e, out = Path(sys.argv[1]), Path(sys.argv[2])
walls = dict(line.split() for line in (e2e / "walls").read_text().splitlines())
from kdengine.store import open_store
store = open_store(e2e / "store")
tokens = sum(len(store[i]["input_ids"]) for i in range(len(store)))
metrics = [json.loads(l) for l in (e2e / "run" / "metrics.jsonl").read_text().splitlines()]
evals = [json.loads(l) for l in (e2e / "run" / "eval.jsonl").read_text().splitlines()]
train_tps = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
train_tps = train_tps[1:] or train_tps  # the first window includes warm-up
stu = json.loads((e2e / "eval-student" / "report.json").read_text())
tea = json.loads((e2e / "eval-teacher" / "report.json").read_text())
rows = [
    (f"dump ({sys.argv[3]} teacher, top-64)", f"{tokens} tokens, {len(store)} samples", f"{tokens / float(walls['dump']):,.0f} tok/s (wall, load incl.)"),
    ("train (sparse KL kernel)", f"{metrics[-1]['step']} steps, loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}",
     f"{sum(train_tps) / max(len(train_tps), 1):,.0f} tok/s (mean of logged windows)"),
    ("held-out eval in training", f"kd {evals[0]['eval_kd']:.3f} -> {evals[-1]['eval_kd']:.3f}, top-1 {evals[0]['eval_top1']:.3f} -> {evals[-1]['eval_top1']:.3f}", ""),
    (f"eval gsm8k student (hf, {sys.argv[4]})", f"{stu['correct']}/{stu['n']} = {stu['accuracy']:.3f}", f"{stu['tokens_per_s']:,.0f} new tok/s"),
    (f"eval gsm8k teacher ({sys.argv[3]})", f"{tea['correct']}/{tea['n']} = {tea['accuracy']:.3f}", f"{tea['tokens_per_s']:,.0f} new tok/s"),
]
where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
table = [f"# End to end: dump -> train -> eval ({where})", "",
         "| stage | result | speed |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
table += ["", "wall seconds per stage: " + ", ".join(f"{k} {float(v):.0f}" for k, v in walls.items())]
(out / "e2e.md").write_text("\n".join(table) + "\n")
print("\n".join(table))
EOF
