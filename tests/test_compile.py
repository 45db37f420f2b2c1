"""``[compile]``: every decoder and MTP block compiled on its own (and the loss) gives the eager model's
logits and gradients. The fast ``aot_eager`` backend traces the same graphs inductor would get."""

import dataclasses

import torch

from titan_dsv4.components.loss import MTPLoss, build_targets
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
from titan_dsv4.models.deepseek_v4.parallelize import apply_compile


def test_compiled_blocks_and_loss_equal_eager():
    args = dataclasses.replace(FLAVORS["debugmodel"], num_hidden_layers=2, compress_ratios=[4, 16, 0])
    ids = torch.randint(0, args.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    targets = build_targets(ids.roll(-1, 1), torch.arange(64).expand(2, 64), args.num_nextn_predict_layers)
    results = []
    for compiled in (False, True):
        model = DeepseekV4Model(args)
        model.init_weights(0)
        model.train()
        loss_fn = MTPLoss(args.num_nextn_predict_layers, 0.3)
        if compiled:
            apply_compile(model, backend="aot_eager")
            loss_fn.compile("aot_eager")
        loss = loss_fn(model(ids), targets)
        loss.backward()
        grads = {n.replace("_orig_mod.", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (eager_loss, eager), (compiled_loss, compiled) = results
    assert all(type(b).__name__ == "OptimizedModule" for b in [*model.layers.values(), *model.mtp.values()])
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled.keys() == eager.keys()
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-6, msg=name)
