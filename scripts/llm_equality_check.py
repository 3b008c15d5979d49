"""Can a from-scratch tiny LLaMA learn to compare two words? The yes/no diagnosis of the README.

The task is deem's chat template around "The objects are: {colour} {shape}. Is there something {colour'}
in the image? Please answer yes or no." Half of the questions ask about the described colour. The
answer (" Yes"/" No" + EOS) is the only target. It uses the tiny tokenizer and configs/tiny.toml's LLM shape
in HF transformers' LlamaForCausalLM, with AdamW and a cosine schedule (deem's stage II recipe). It prints
the loss and the AUC of logit(" Yes") - logit(" No") on 300 held-out questions (0.5 = no signal).
Measured: answer-only loss stays at ln2/3 = 0.23, AUC 0.49-0.50, after 3000 and 10 000 steps (also at lr
3e-3); with --lm-prompt (next-token loss on the prompt too) AUC reaches 1.000 by step 750; with
--lm-prompt --pack 7 (7 conversations per row in one causal sequence, as deem packed rows before
train.isolate_documents) it stays at 0.46 after 1500 steps.

    .venv/bin/pip install transformers tokenizers
    .venv/bin/python scripts/llm_equality_check.py --steps 3000
"""
import argparse
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "cyan", "white", "pink", "brown"]
SHAPES = ["square", "circle", "triangle", "diamond", "cross", "ring", "star", "hexagon", "bar"]
BOS, EOS, PAD = 1, 2, 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=28)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm-prompt", action="store_true", help="also train next-token prediction on the prompt")
    ap.add_argument("--pack", type=int, default=1, help="conversations packed per row, no document mask (deem's rows)")
    a = ap.parse_args()
    if a.pack > 1 and not a.lm_prompt:
        ap.error("--pack needs --lm-prompt (a packed row's answer-only labels are not tracked)")
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    tok = Tokenizer.from_file(str(Path(__file__).resolve().parent.parent / "assets/tiny-tokenizer.json"))
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    system = enc("You are a helpful assistant.")

    def sample():
        c, s = random.choice(COLOURS), random.choice(SHAPES)
        yes = random.random() < 0.5
        q = c if yes else random.choice([x for x in COLOURS if x != c])
        text = f" The objects are: {c} {s}. Is there something {q} in the image? Please answer yes or no."
        ctx = [BOS] + system + enc(" USER:") + enc(text) + enc(" ASSISTANT:")
        return ctx, enc(" Yes" if yes else " No") + [EOS]

    test = [sample() for _ in range(300)]
    yes_id, no_id = enc(" Yes")[0], enc(" No")[0]
    cfg = LlamaConfig(vocab_size=1030, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                      max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=BOS,
                      eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    warm = 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))

    def batch(items):
        n = max(len(c) + len(r) for c, r in items)
        ids = torch.full((len(items), n), PAD)
        labels = torch.full((len(items), n), -100)
        att = torch.zeros((len(items), n), dtype=torch.long)
        for i, (c, r) in enumerate(items):
            s = c + r
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
            start = 1 if a.lm_prompt else len(c)
            labels[i, start : len(s)] = torch.tensor(s[start:])
        return ids, labels, att

    def auc():
        model.eval()
        with torch.no_grad():
            ids, _, att = batch(test)
            logits = model(input_ids=ids, attention_mask=att).logits
        model.train()
        m = [(float(logits[i, len(c) - 1, yes_id] - logits[i, len(c) - 1, no_id]), r[0] == yes_id)
             for i, (c, r) in enumerate(test)]
        pos = [x for x, y in m if y]
        neg = [x for x, y in m if not y]
        return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))

    t0 = time.time()
    for step in range(a.steps):
        items = [sample() for _ in range(a.batch)]
        if a.pack > 1:
            # Several conversations per row, one causal mask across them: every target as before.
            rows = [items[i : i + a.pack] for i in range(0, len(items), a.pack)]
            items = [(sum((c + r for c, r in row[:-1]), []) + row[-1][0], row[-1][1]) for row in rows]
        ids, labels, att = batch(items)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == a.steps - 1:
            print(f"step {step} loss {loss.item():.4f} AUC {auc():.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
