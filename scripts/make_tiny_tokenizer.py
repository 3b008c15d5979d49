"""Builds assets/tiny-tokenizer.json: the tiny model's tokenizer (byte-level BPE, 1024 base ids, LLaMA's
<unk>/<s>/</s> at 0/1/2, BOS prepended), trained deterministically on the words the synthetic world and
the evaluation prompts use plus plain English. Run once; the output is committed.

    .venv/bin/python scripts/make_tiny_tokenizer.py
"""
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

COLOURS = "red green blue yellow orange purple cyan white black gray pink brown".split()
SHAPES = ("square rectangle circle triangle star cross diamond ring heart hexagon bar stripe ellipse "
          "pentagon arrow moon").split()
WORDS = ("a an the is are there in this image photo picture of main object objects please answer yes no "
         "question based on provide accurate within one word short description could you describe what "
         "how many colour color shape left right top bottom middle center small large big tiny next to "
         "and with on above below near one two three four five six seven eight nine ten zero it they "
         "you are helpful assistant user system draw show me make generate create here an sketch outline "
         "texture noisy background cluttered pattern shows contains has have not see can i do does").split()


def corpus():
    lines = []
    for c in COLOURS:
        for s in SHAPES:
            lines.append(f"a {c} {s}. There is a {c} {s} in the image. Is the {s} {c}? yes.")
            lines.append(f"Is {c} {s} the main object in this image? Please answer yes or no. The answer is no.")
    lines.append(" ".join(WORDS))
    lines += [f"{n} objects" for n in range(100)]
    here = os.path.dirname(os.path.abspath(__file__))
    seeds = os.path.join(here, "..", "..", "shared", "seeds")
    if os.path.isdir(seeds):
        for name in sorted(os.listdir(seeds)):
            with open(os.path.join(seeds, name), encoding="utf-8", errors="ignore") as f:
                lines += f.read().splitlines()
    return lines


def main():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    assert tok.get_vocab_size() == 1024, tok.get_vocab_size()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "tiny-tokenizer.json")
    tok.save(out)
    print(out, tok.get_vocab_size(), tok.encode("Is a red square the main object in this image?").tokens)


if __name__ == "__main__":
    main()
