#!/usr/bin/env bash
# The GPU check: memtool's jobs on one CUDA device, timed (results: benchmarks/README.md, "GPU").
#  1. the MNIST reference estimate's recipe (784-256-10 MLPs, 20 epochs on 70 % of the first 5,000
#     samples) for TRIALS trials, and its scores against the committed CPU reference (references/mnist);
#  2. configs/paper-cifar100.yaml shrunk (every stage but validate / finding (b), AutoAttack too) on
#     a tiny synthetic CIFAR-100 folder, then PreAct-ResNet-18 (bf16, augmentation) throughput:
#     EPOCHS_RN epochs of standard training and of PGD-10 AT on RN_TRAIN synthetic CIFAR-100 images;
#  3. the robust study's small-CNN PGD-AT recipe (benchmarks/cnn_recipe.sh, MNIST, seed 0) with
#     clean, PGD-20 and standard AutoAttack on the first 1,000 test samples;
#  4. the robust memorization stage of both reference configs (16 PGD-AT CNNs each), trained afresh;
#     its score tables and cost packed as RESULTS_DIR/robust_estimate.tgz (records/NAME/robust_estimate:
#     what references/NAME/robust_estimate holds);
#  5. stacked against one at a time for the MLP, the CNN and a BN-ResNet, K = 16, 32, 64;
#  6. the findings in the regime (configs/regime-mnist.yaml), records packed as RESULTS_DIR/regime.tgz.
# Usage: bash benchmarks/gpu_check.sh WORK_DIR [RESULTS_DIR]   (RESULTS_DIR gets the logs and records)
# A bare GPU machine: first `bash benchmarks/gpu_bundle.sh` here, carry .gpu/, and there export
# PYTHONPATH=$PWD/.gpu/site:$PWD MEMTOOL_DATA_ROOT=$PWD/.gpu/data (torch, numpy, pandas, ... from its image).
# Env: DEVICE (cuda), TRIALS (2000), RN_TRAIN (20000), EPOCHS_RN (2), PYTHON (python3),
# SKIP ("estimate paper cnn": steps to leave out). Each step has its own time limit (LIMIT_*).
set -uo pipefail
W=${1:?usage: gpu_check.sh WORK_DIR [RESULTS_DIR]}
R=${2:-$W/results}
export W R DEVICE=${DEVICE:-cuda} TRIALS=${TRIALS:-2000} RN_TRAIN=${RN_TRAIN:-20000} EPOCHS_RN=${EPOCHS_RN:-2}
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
export MEMTOOL="$PYTHON -m memtool"
SKIP=${SKIP:-}
mkdir -p "$W" "$R"
step() {  # step NAME LIMIT_S: run the function NAME under a time limit, print its wall time
  local name=$1 limit=$2 t0=$SECONDS
  case " $SKIP " in *" $name "*) echo "== $name: skipped"; return;; esac
  echo "== $name (limit ${limit} s)"
  export -f "$name"
  timeout "$limit" bash -o pipefail -c "$name"; local rc=$?
  echo "== $name: rc $rc, $((SECONDS - t0)) s wall"
}
$PYTHON - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

# 1. MNIST MLP trials
estimate() {
  $MEMTOOL estimate --dataset mnist --limit 5000 --trials "$TRIALS" --ratio 0.7 --seed 0 --model mlp \
    --hidden 256 --epochs 20 --batch-size 128 --lr 0.1 --schedule constant --device "$DEVICE" --out "$W/mnist-mlp" &&
  $MEMTOOL compare references/mnist "$W/mnist-mlp" --json > "$R/mnist-mlp-compare.json" &&
  cp "$W/mnist-mlp/run.json" "$R/mnist-mlp-run.json" && cp "$W/mnist-mlp/log.jsonl" "$R/mnist-mlp-log.jsonl" &&
  cat "$R/mnist-mlp-compare.json"
}
step estimate "${LIMIT_ESTIMATE:-200}"

# 2. the paper config, shrunk, then PreAct-ResNet-18 throughput
paper() {
  $PYTHON - "$W" "$RN_TRAIN" <<'EOF' || return
import sys
from pathlib import Path
import numpy as np
import yaml
w, n_big = Path(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for root, sizes in (("small", (("train.bin", 256), ("test.bin", 64))), ("big", (("train.bin", n_big), ("test.bin", 1000)))):
    folder = w / root / "cifar-100-binary"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in sizes:  # the real binary format: coarse label, fine label, 3,072 pixels
        rec = np.concatenate([rng.integers(0, 100, (n, 2)), rng.integers(0, 256, (n, 3072))], 1).astype(np.uint8)
        (folder / name).write_bytes(rec.tobytes())
cfg = yaml.safe_load(Path("configs/paper-cifar100.yaml").read_text())
cfg["runs"] = str(w / "runs")
cfg["estimate"].update(trials=4, epochs=1, batch_size=64)
cfg["finding_a"].update(seeds=1, pgd_steps=2, recipe={**{k: cfg["estimate"][k] for k in (
    "model", "batch_size", "lr", "schedule", "precision")}, "epochs": 1})
cfg["bat_comparison"].update(seeds=1, pgd_steps=2, variants=["standard", "pgd-at", "bat"], aa_samples=32,
                             aa_variants=["pgd-at"], recipe={**cfg["bat_comparison"]["recipe"], "epochs": 1, "batch_size": 64})
for stage in ("validate", "finding_b"):  # they need high-influence pairs / atypical samples: none at this size
    cfg.pop(stage)
(w / "paper.yaml").write_text(yaml.safe_dump(cfg))
EOF
  $MEMTOOL figures --config "$W/paper.yaml" --out "$W/figs" --device "$DEVICE" --data-root "$W/small" --quiet &&
  cp "$W/figs/cifar100/manifest.json" "$R/paper-manifest.json" || return
  local rn="--dataset cifar100 --data-root $W/big --model preact-resnet18 --precision bf16 --epochs $EPOCHS_RN
            --optimizer sgd --lr 0.2 --weight-decay 0.0005 --schedule onecycle --eval-samples 0 --device $DEVICE --quiet"
  $MEMTOOL train $rn --batch-size 256 --out "$W/rn-standard" &&
  $MEMTOOL train $rn --batch-size 128 --method pgd-at --pgd-steps 10 --out "$W/rn-pgd-at" &&
  cp "$W/rn-standard/log.jsonl" "$R/rn-standard-log.jsonl" && cp "$W/rn-pgd-at/log.jsonl" "$R/rn-pgd-at-log.jsonl"
}
step paper "${LIMIT_PAPER:-100}"

# 3. the small-CNN PGD-AT recipe with AutoAttack
cnn() {
  DEVICE=$DEVICE OMP_NUM_THREADS=4 bash benchmarks/cnn_recipe.sh "$W/cnn" mnist 0 &&
  mkdir -p "$R/cnn" && cp "$W/cnn/mnist-pgd-at-seed0/log.jsonl" "$W/cnn/mnist-pgd-at-seed0/eval/summary.json" \
    "$W/cnn/mnist-pgd-at-seed0/eval/robustbench.json" "$R/cnn/"
}
step cnn "${LIMIT_CNN:-150}"

# 4. robust memorization, both references, trained afresh (runs and records under WORK_DIR); the kept
# score tables come back as RESULTS_DIR/robust_estimate.tgz (unpack in WORK_DIR's place: records/NAME/robust_estimate)
robust() {
  for name in mnist fashion-mnist; do
    sed -e "s|^runs: .*|runs: $W/runs|" -e "s|^records: .*|records: $W/records|" configs/reference-$name.yaml \
      > "$W/robust-$name.yaml"
    mkdir -p "$W/records/$name" && cp references/$name/*.parquet references/$name/*.npz references/$name/run.json \
      "$W/records/$name/"  # the committed estimate, read as before
    $MEMTOOL figures --config "$W/robust-$name.yaml" --stages robust_estimate --out "$W/figs-robust" \
      --device "$DEVICE" --quiet || return
  done
  tar czf "$R/robust_estimate.tgz" -C "$W" records/mnist/robust_estimate records/fashion-mnist/robust_estimate
}
step robust "${LIMIT_ROBUST:-120}"

# 5. any module, stacked (hand-written / torch.func) or one at a time, K = 16-64 (issue 32)
stack() {
  $PYTHON benchmarks/func_stack.py --device "$DEVICE" --k 16 32 64 --repeat 2 | tee "$R/func_stack.md"
}
step stack "${LIMIT_STACK:-150}"

# 6. the findings in the regime (issue 31: PGD-AT at eps 0.1 for 20 epochs), resuming from the committed
#    per-model records; they come back as RESULTS_DIR/regime.tgz (unpack in references/'s place)
regime() {
  sed -e "s|^runs: .*|runs: $W/runs|" -e "s|^records: .*|records: $W/records|" configs/regime-mnist.yaml \
    > "$W/regime-mnist.yaml"
  mkdir -p "$W/records" && cp -r references/mnist references/mnist-regime "$W/records/" 2>/dev/null
  $MEMTOOL figures --config "$W/regime-mnist.yaml" --stages finding_a,finding_b --out "$W/figs-regime" \
    --device "$DEVICE" --quiet
  tar czf "$R/regime.tgz" -C "$W/records" mnist-regime
}
step regime "${LIMIT_REGIME:-300}"
