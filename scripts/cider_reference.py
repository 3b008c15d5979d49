"""The reference values of tests/data.rs `caption_scores_follow_coco_captions_cider_d`: coco-caption's
CIDEr-D (pycocoevalcap 1.2) on hand-made captions.

    pip install --target /tmp/pcclib --no-deps pycocoevalcap==1.2 && pip install --target /tmp/pcclib numpy
    PYTHONPATH=/tmp/pcclib python scripts/cider_reference.py
"""
from pycocoevalcap.cider.cider import Cider
refs = {
    0: ["the red circle"],
    1: ["the blue square"],
    2: ["the green star"],
    3: ["the red star"],
    4: ["a small yellow triangle near the top"],
}
cands = {
    0: ["the red circle"],
    1: ["the red square"],
    2: ["green star"],
    3: ["the blue circle"],
    4: ["a yellow triangle near the top of the image"],
}
score, scores = Cider().compute_score(refs, cands)
print(repr(score), [repr(float(x)) for x in scores])
