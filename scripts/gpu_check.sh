#!/usr/bin/env bash
# The GPU check: run it on a machine with a CUDA device (the test suite never depends on it).
#   bash scripts/gpu_check.sh            # compares cuda:0 against the CPU
#   bash scripts/gpu_check.sh --device cpu   # a dry run of the same steps on the CPU (CI-able)
# 1. CUDA parity of every component against the CPU (`deem forward` on the reference fixtures: the LLM,
#    the vision encoder, the resampler, the UNet, the VAE, a DDIM sampling loop).
# 2. Three training steps of tiny DEEM with the reference trainer on the device against the CPU.
# 3. Throughput: a pipelined step of tiny DEEM with every actor on the device (samples/s), and bf16
#    training (model.dtype = "bf16") on the device against bf16 on the CPU.
# 4. A 1B-parameter LLM (DEEM-7B's vision and diffusion parts) training in bf16 on the device: tokens/s
#    and model FLOPs utilisation (the step's FLOPs from `deem plan`, over the measured step time and
#    the device's peak: PEAK_TFLOPS, default 989, an H100's dense bf16).
# Prints one line per check and a summary; exits non-zero when a check fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEVICE="cuda:0"
if [ "${1:-}" = "--device" ]; then DEVICE="${2:?--device needs a value}"; fi

bash scripts/setup.sh >/dev/null
source scripts/env.sh
cargo build --release -q -p deem-actors
DEEM="$ROOT/target/release/deem"
PY="$ROOT/.venv/bin/python"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
export DEEM_LOG=warn PYTHONWARNINGS=ignore

"$DEEM" info
if [ "$DEVICE" != "cpu" ] && "$DEEM" info | grep -q "CUDA              not available"; then
    echo "gpu_check: no CUDA device visible to deem (see 'deem info' above); run it on a GPU machine or pass --device cpu" >&2
    exit 2
fi

FAILED=0
# compare NAME TOL A B TENSORS...: the largest |a - b| over the named tensors.
compare() {
    local name="$1" tol="$2" a="$3" b="$4"; shift 4
    if "$PY" - "$a" "$b" "$tol" "$name" "$@" <<'EOF'
import json, struct, sys
import torch
DT = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
def load_file(path):
    # safetensors: an 8-byte little-endian header length, the JSON header, then the raw tensors.
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = bytearray(raw[8 + n:])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        lo, hi = meta["data_offsets"]
        out[name] = torch.frombuffer(body[lo:hi], dtype=DT[meta["dtype"]]).reshape(meta["shape"])
    return out
a, b, tol, name, names = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5:]
A, B = load_file(a), load_file(b)
d = max((A[n].double() - B[n].double()).abs().max().item() for n in names)
print(f"{name:<28} max |device - cpu| = {d:.3e}  (tolerance {tol:g})  {'ok' if d <= tol else 'FAILED'}")
sys.exit(0 if d <= tol else 1)
EOF
    then :; else FAILED=1; fi
}

SIZES=(--set "vision.depths=[1,1,2,1]" --set "vision.dims=[8,16,24,32]" --set vision.embed_dim=24
       --set vision.adapter_width=24 --set resampler.encoder_hidden_size=24 --set resampler.hidden_size=16
       --set resampler.num_hidden_layers=3 --set resampler.num_attention_heads=2
       --set resampler.intermediate_size=32 --set llm.hidden_size=32
       --set diffusion.unet.cross_attention_dim=20 --set diffusion.condition.width=20)
# forward COMPONENT FIXTURE DEVICE: writes $OUT/COMPONENT-DEVICE.safetensors (the sizes of
# tests/fixtures/generate.py for the LLM, vision and resampler; the diffusion fixtures carry theirs).
forward() {
    local component="$1" fx="tests/fixtures/$2" device="$3" sizes=()
    case "$component" in llm|vision|resampler) sizes=("${SIZES[@]}") ;; esac
    "$DEEM" forward "$component" --checkpoint "$fx" --inputs "$fx/inputs.safetensors" \
        --output "$OUT/$component-${device/:/}.safetensors" --device "$device" "${sizes[@]}" >/dev/null
}

echo "== 1. components on $DEVICE against the CPU =="
# f32 throughout; convolutions may use TF32 on the GPU (cuDNN's default), hence their looser bound.
for spec in "llm llama_gqa 1e-4 logits" "vision vision 5e-3 tokens" "resampler resampler 1e-4 visual_tokens csr_condition" \
            "unet unet 5e-3 noise_pred" "vae-encode vae 5e-3 latent_mean"; do
    set -- $spec
    component="$1" fx="$2" tol="$3"; shift 3
    forward "$component" "$fx" cpu
    forward "$component" "$fx" "$DEVICE"
    compare "$component" "$tol" "$OUT/$component-${DEVICE/:/}.safetensors" "$OUT/$component-cpu.safetensors" "$@"
done

# train_vs_cpu NAME TOL [--set …]: 3 steps of tiny DEEM with the reference trainer on the CPU and on the
# device; the largest relative difference of the losses.
train_vs_cpu() {
    local name="$1" tol="$2"; shift 2
    for d in cpu "$DEVICE"; do
        "$DEEM" train --single-process --device "$d" --quiet --steps 3 --run-dir "$OUT/$name-${d/:/}" "$@" >/dev/null
    done
    if "$PY" - "$OUT/$name-cpu/steps.jsonl" "$OUT/$name-${DEVICE/:/}/steps.jsonl" "$tol" "$name" <<'EOF'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
tol, name = float(sys.argv[3]), sys.argv[4]
worst = max(abs(x["total"] - y["total"]) / abs(x["total"]) for x, y in zip(a, b))
print(f"{name + ' losses':<28} max relative |device - cpu| = {worst:.3e}  (tolerance {tol:g})  {'ok' if worst <= tol else 'FAILED'}")
sys.exit(0 if worst <= tol else 1)
EOF
    then :; else FAILED=1; fi
}

echo "== 2. the reference trainer on $DEVICE against the CPU (3 steps of tiny DEEM) =="
# Three AdamW steps on another device's kernels: relative 1e-3 on the loss.
train_vs_cpu training 1e-3

echo "== 3. a pipelined step of tiny DEEM with every actor on $DEVICE =="
sed "s/device = \"cpu\"/device = \"$DEVICE\"/" topologies/cpu.toml > "$OUT/one-device.toml"
"$DEEM" train --topology "$OUT/one-device.toml" --quiet --steps 6 --run-dir "$OUT/pipe" \
    --set train.batch_size=16 --set train.microbatches=4 >/dev/null
"$PY" - "$OUT/pipe/steps.jsonl" <<'EOF'
import json, sys
s = [json.loads(l) for l in open(sys.argv[1])][1:]
print(f"{'pipelined tiny step':<28} {sum(x['seconds'] for x in s) / len(s):.3f} s/step, "
      f"{sum(x['samples_per_second'] for x in s) / len(s):.1f} samples/s (batch 16, 4 microbatches)")
EOF

echo "== 3b. bf16 training: the reference trainer on $DEVICE against the CPU (3 steps, model.dtype = bf16) =="
# bf16 rounds at 2^-9, and other kernels round in other places: relative 2e-2 on the loss.
train_vs_cpu bf16-training 2e-2 --set 'model.dtype="bf16"'

echo "== 4. a 1B-parameter LLM training in bf16 on $DEVICE: tokens/s and model FLOPs utilisation =="
# DEEM-7B's vision encoder and UNet with a 1.1B LLaMA (2048 wide, 16 layers), stage II (the LLM trains).
ONE_B=(--config configs/deem-7b.toml --set llm.hidden_size=2048 --set llm.intermediate_size=5504
       --set llm.num_hidden_layers=16 --set llm.num_attention_heads=16 --set llm.num_key_value_heads=16
       --set 'model.dtype="bf16"' --set 'train.stage="II"' --set train.batch_size=8 --set train.microbatches=4)
STEPS1B="${STEPS1B:-4}"
if [ "$DEVICE" = "cpu" ]; then
    # The dry run: a small LLM and small images, so that the CPU gets through it.
    ONE_B+=(--set llm.hidden_size=256 --set llm.intermediate_size=688 --set llm.num_hidden_layers=2
            --set llm.num_attention_heads=4 --set llm.num_key_value_heads=4 --set diffusion.image_size=64
            --set vision.image_size=64 --set train.batch_size=2 --set train.microbatches=1)
    STEPS1B=2
fi
"$DEEM" train --topology "$OUT/one-device.toml" --quiet --steps "$STEPS1B" --run-dir "$OUT/one-b" "${ONE_B[@]}" >/dev/null
FLOPS=$("$DEEM" plan --topology "$OUT/one-device.toml" --synthetic --assume-cuda-devices 1 "${ONE_B[@]}" \
    | sed -n 's/^model FLOPs per step: \([0-9.]*\) TFLOP.*/\1/p')
"$PY" - "$OUT/one-b/steps.jsonl" "$FLOPS" "${PEAK_TFLOPS:-989}" <<'EOF'
import json, sys
s = [json.loads(l) for l in open(sys.argv[1])]
s = s[1:] if len(s) > 1 else s
secs = sum(x["seconds"] for x in s) / len(s)
tflop, peak = float(sys.argv[2]), float(sys.argv[3])
tokens = sum(x["tokens_per_second"] for x in s) / len(s)
print(f"{'1B-LLM bf16 step':<28} {secs:.3f} s/step, {tokens:.0f} tokens/s, {tflop:.3f} TFLOP/step, "
      f"{tflop / secs:.2f} TFLOP/s: MFU {100 * tflop / secs / peak:.2f}% of {peak:g} TFLOP/s")
EOF

if [ "$FAILED" = 0 ]; then echo "gpu_check: every check passed on $DEVICE"; else echo "gpu_check: FAILED on $DEVICE" >&2; exit 1; fi
