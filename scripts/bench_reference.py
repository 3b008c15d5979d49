"""deem against the reference libraries, both sides in one command, on the same weights:

  1. greedy decode tokens/s: HF transformers `generate` vs `deem bench decode` (serving path);
  2. DDIM sampling steps/s: a diffusers UNet2DConditionModel + DDIMScheduler loop vs `deem bench unet`.

The weights are random-initialised at the tiny config's sizes (configs/tiny.toml) and saved with
`save_pretrained`, so both sides load the very same files. Needs transformers and diffusers in .venv:

    .venv/bin/pip install transformers diffusers
    make build && .venv/bin/python scripts/bench_reference.py [--threads 2]
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best_of(n, fn):
    best = float("inf")
    out = None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def deem(*args):
    exe = os.path.join(ROOT, "target", "release", "deem")
    out = subprocess.run([exe, "bench", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tempfile.mkdtemp(prefix="deem-bench-")
    # The tiny config's LLM and UNet.
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    llama.save_pretrained(os.path.join(tmp, "llama"))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=64, use_linear_projection=True,
        norm_num_groups=8).eval()
    unet.save_pretrained(os.path.join(tmp, "unet"))

    # 1. Decode.
    ids = torch.tensor([[3 + i % 1021 for i in range(a.prompt_tokens)]])
    with torch.no_grad():
        hf_s, hf_out = best_of(a.repeats, lambda: llama.generate(
            ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0))
    hf_tps = a.new_tokens / hf_s
    d = deem("decode", "--checkpoint", os.path.join(tmp, "llama"), "--prompt-tokens", str(a.prompt_tokens),
             "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats), "--threads", str(a.threads))
    same = hf_out[0, a.prompt_tokens:].tolist() == d["generated"]

    # 2. DDIM steps.
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(a.steps)
    lat0 = torch.randn(1, 4, 16, 16)
    ctx = torch.randn(1, 77, 64)

    def loop():
        x = lat0
        for t in sched.timesteps:
            x = sched.step(unet(x, t, encoder_hidden_states=ctx).sample, t, x).prev_sample
        return x

    with torch.no_grad():
        df_s, _ = best_of(a.repeats, loop)
    df_sps = a.steps / df_s
    u = deem("unet", "--checkpoint", os.path.join(tmp, "unet"), "--steps", str(a.steps), "--repeats", str(a.repeats),
             "--threads", str(a.threads))

    print(f"threads: {a.threads}; torch {torch.__version__}")
    print(f"greedy decode, {a.new_tokens} tokens after {a.prompt_tokens} (tiny LLaMA):")
    print(f"  transformers generate: {hf_tps:9.1f} tokens/s")
    print(f"  deem (KV pool path):   {d['tokens_per_second']:9.1f} tokens/s   ratio deem ÷ HF = {d['tokens_per_second'] / hf_tps:.2f}")
    print(f"  same tokens: {same}")
    print(f"DDIM sampling, {a.steps} steps (tiny UNet, 16×16 latents, 77-token context):")
    print(f"  diffusers:             {df_sps:9.1f} steps/s")
    print(f"  deem:                  {u['steps_per_second']:9.1f} steps/s   ratio deem ÷ diffusers = {u['steps_per_second'] / df_sps:.2f}")


if __name__ == "__main__":
    main()
