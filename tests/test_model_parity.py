"""Our DeepSeek-V4 backbone against Hugging Face transformers' DeepseekV4ForCausalLM on the same weights."""

import dataclasses

import pytest
import torch

from hf_reference import random_model, transformers_twin
from titan_dsv4.models.deepseek_v4 import FLAVORS

# 16 indexer heads: an indexer score is exactly 0 only when every head's ReLU is 0 (1/2^heads for random
# weights), and the top-k order among exact ties is unspecified (we break them by position, transformers
# by torch.topk's internal order), so keep exact ties out of the comparison
BASE = dataclasses.replace(FLAVORS["debugmodel"].with_mtp_layers(0), index_n_heads=16)

CASES = {
    # sliding, CSA (indexer top-8), HCA ratio 16, CSA; layer 0 hash-routed
    "debug": (dict(), [(2, 1), (2, 7), (3, 33), (2, 77)]),
    # hc_mult 2, small window, HCA ratio 8, two hash layers
    "hc2_window8": (dict(hc_mult=2, sliding_window=8, compress_ratios=[4, 8, 0, 4], num_hash_layers=2),
                    [(3, 19), (2, 41)]),
    # learned routing only, sigmoid scores, indexer keeps 3 entries, HCA first
    "learned_sigmoid": (dict(num_hidden_layers=3, compress_ratios=[8, 0, 4], num_hash_layers=0,
                             scoring_func="sigmoid", index_topk=3, sliding_window=16), [(2, 50)]),
    # no YaRN, top-1 routing, three o-groups of heads
    "plain_rope_top1": (dict(num_attention_heads=6, o_groups=3, num_experts_per_tok=1, rope_scaling=None,
                             compress_ratios=[0, 4, 0, 16]), [(2, 35)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name):
    overrides, shapes = CASES[name]
    args = dataclasses.replace(BASE, **overrides)
    ours = random_model(args, seed=len(name)).eval()
    theirs = transformers_twin(ours)
    for batch, seq in shapes:
        ids = torch.randint(0, args.vocab_size, (batch, seq))
        with torch.no_grad():
            got = ours(ids)
            want = theirs(input_ids=ids).logits
        assert got.shape == want.shape == (batch, seq, args.vocab_size)
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-4 * scale, f"{name} B={batch} S={seq}"


def test_mixing_orientation_matters():
    """The comparison can fail: using comb instead of comb^T in the residual update breaks parity."""
    from titan_dsv4.models.deepseek_v4 import hyper_connection

    args = BASE
    ours = random_model(args, seed=3).eval()
    theirs = transformers_twin(ours)
    ids = torch.randint(0, args.vocab_size, (2, 40))
    original = hyper_connection.HyperConnection.post

    def wrong(out, residual, post, comb):
        return original(out, residual, post, comb.transpose(-1, -2))

    hyper_connection.HyperConnection.post = staticmethod(wrong)
    try:
        with torch.no_grad():
            diff = (ours(ids) - theirs(input_ids=ids).logits).abs().max()
    finally:
        hyper_connection.HyperConnection.post = staticmethod(original)
    assert diff > 1e-2
