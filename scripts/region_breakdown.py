"""Region captions of the synthetic world, word by word: does the model name the masked object?

Reads `deem eval --regions` output (eval.json) and the region files it evaluated, and prints per split how
often the answer holds the reference's colour and shape words, and, on images with two or more objects
of distinct colours, the colour accuracy against the baseline of always naming the main (largest)
object's colour: above that baseline, the answers follow the mask.

    python scripts/region_breakdown.py runs/tiny-stage3/eval.json data/synth/eval
"""
import collections
import json
import sys


def main(eval_json, eval_dir):
    ev = json.load(open(eval_json))
    print("| split | regions | colour word | shape word | multi-object regions | colour | main-object baseline |")
    print("|---|---|---|---|---|---|---|")
    for name in sorted(k for k in ev if k.startswith("regions/")):
        split = name.split("/", 1)[1]
        anns = json.load(open(f"{eval_dir}/regions_{split}.json"))["annotations"]
        answers = ev[name]["answers"]
        if len(anns) != len(answers):
            sys.exit(f"{name}: {len(answers)} answers for {len(anns)} regions (another data folder?)")

        def has(x, i):
            return x["reference"].split()[i] in x["answer"].lower().split()

        colour = sum(has(x, 1) for x in answers) / len(answers)
        shape = sum(has(x, 2) for x in answers) / len(answers)
        by_image = collections.defaultdict(list)
        for a, x in zip(anns, answers):
            by_image[a["image_id"]].append((a, x))
        n = ok = main_ok = 0
        for regions in by_image.values():
            colours = [x["reference"].split()[1] for _, x in regions]
            if len(regions) < 2 or len(set(colours)) < len(colours):
                continue
            main = max(regions, key=lambda r: r[0]["area"])[1]["reference"].split()[1]
            for _, x in regions:
                n += 1
                ok += has(x, 1)
                main_ok += x["reference"].split()[1] == main
        print(f"| {split} | {len(answers)} | {colour:.3f} | {shape:.3f} | {n} | {ok / max(n, 1):.3f} | {main_ok / max(n, 1):.3f} |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
