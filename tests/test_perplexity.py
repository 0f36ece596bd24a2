"""Perplexity (jaxinfer.evaluate) through the engine against HF transformers computing its own loss on the same
windows (HF's sliding-window recipe: labels of the tokens a window does not score set to -100)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import wikitext_ids
from jaxinfer.evaluate import Window, perplexity, sliding_windows


def test_sliding_windows_follow_hfs_recipe():
    # hand-computed: each window scores what the previous one did not; the very first token is never scored
    assert sliding_windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    # disjoint windows (stride = context): nothing in a window predicts its first token, so HF skips it too
    assert sliding_windows(10, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    assert sliding_windows(5, 8, 3) == [Window(0, 5, 1)]
    for n, context, stride in ((1000, 256, 128), (999, 100, 37), (64, 64, 64)):
        scored = [p for w in sliding_windows(n, context, stride) for p in range(w.first, w.end)]
        assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(10, 4, 5)


def _hf_perplexity(model, ids, context, stride):
    """HF's recipe, with the windows (all of one length here) in one batch: HF's loss is then the mean NLL
    over every scored token of every window, which is what the recipe's weighted sum computes."""
    inputs, labels, prev_end = [], [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        window = torch.tensor(ids[begin:end])
        target = window.clone()
        target[:-(end - prev_end)] = -100
        inputs.append(window)
        labels.append(target)
        prev_end = end
        if end == len(ids):
            break
    inputs, labels = torch.stack(inputs), torch.stack(labels)
    with torch.no_grad():
        loss = model(inputs, labels=labels).loss  # mean over labels[:, 1:] != -100 (HF shifts them)
    return math.exp(float(loss)), int((labels[:, 1:] != -100).sum())


def test_perplexity_through_the_engine_matches_hf(llm, hf_model, tokenizer):
    ids = wikitext_ids(tokenizer, 400, offset=1000)
    ours = perplexity(llm, ids, context=160, stride=80, progress=False)
    ref, count = _hf_perplexity(hf_model, ids, 160, 80)
    assert ours.num_scored == count == len(ids) - 1 and ours.num_windows == 4
    assert abs(ours.perplexity / ref - 1) < 0.005, (ours.perplexity, ref)  # fp32 both: measured ~1e-6 apart
    assert 3 < ours.perplexity < 200  # a language model on English text, not noise
