"""The lightning indexer's training signal: the KL to the main attention (DeepSeek-V3.2's sparse-stage
indexer loss), which reaches only the indexer and moves it toward the main attention."""

import dataclasses

import torch
import torch.nn.functional as F

from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
from titan_dsv4.models.deepseek_v4.attention import indexer_kl


def test_indexer_kl_matches_torch_kl_div_on_the_chosen_entries():
    torch.manual_seed(0)
    probs = torch.rand(1, 3, 2, 5)  # [B, h, Q, P] main attention (already softmaxed elsewhere)
    scores = torch.randn(1, 2, 5)
    chosen = torch.tensor([[[True, False, True, True, False], [False] * 5]])
    got = indexer_kl(probs.sum(1), scores, chosen)
    idx = chosen[0, 0].nonzero().flatten()
    target = probs[0, :, 0, idx].sum(0)
    target = target / target.sum()
    want = F.kl_div(scores[0, 0, idx].log_softmax(-1), target, reduction="sum")
    torch.testing.assert_close(got[0, 0], want)
    assert got[0, 1] == 0  # a query with nothing chosen contributes nothing (and no NaN)


def _model(scale: float) -> DeepseekV4Model:
    args = dataclasses.replace(FLAVORS["debugmodel"], index_topk=4)
    model = DeepseekV4Model(args).double()
    model.init_weights(0)
    model.train()
    model.set_indexer_loss_scale(scale)
    return model


def _grads(scale: float, ids: torch.Tensor) -> tuple[dict, float]:
    model = _model(scale)
    logits = model(ids)[0]
    F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    kl = sum(float(b) for n, b in model.named_buffers() if n.endswith("kl_sum"))
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, kl


def test_indexer_loss_reaches_only_the_indexer_and_scales_with_its_weight():
    ids = torch.randint(0, 2048, (2, 96), generator=torch.Generator().manual_seed(1))
    frozen, kl0 = _grads(0.0, ids)
    once, kl1 = _grads(1e-2, ids)
    twice, _ = _grads(2e-2, ids)
    indexer = {n for n in once if ".indexer." in n}
    assert indexer and not indexer & frozen.keys() and kl0 == 0.0 < kl1
    assert {n for n in once if n not in indexer} == frozen.keys()
    for name, grad in frozen.items():  # the main model's gradients do not change at all
        assert torch.equal(once[name], grad), name
    for name in indexer:  # the indexer's gradient is the KL's, times its weight
        torch.testing.assert_close(twice[name], 2 * once[name])
        assert once[name].abs().max() > 0, name


def test_training_the_indexer_lowers_its_kl():
    ids = torch.randint(0, 2048, (2, 96), generator=torch.Generator().manual_seed(2))
    model = _model(1.0 / ids.numel())
    params = model.indexer_parameters()
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    optimizer = torch.optim.Adam(params, lr=3e-2)
    history = []
    for _ in range(15):
        for name, b in model.named_buffers():
            if name.endswith("kl_sum"):
                b.zero_()
        logits = model(ids)[0]
        (logits.sum() * 0).backward()  # the indexer's gradient comes from the attached KL alone
        optimizer.step()
        optimizer.zero_grad()
        history.append(sum(float(b) for n, b in model.named_buffers() if n.endswith("kl_sum")))
    assert history[-1] < 0.7 * history[0], history
