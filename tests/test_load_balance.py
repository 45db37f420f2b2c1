"""Aux-loss-free balancing and the balance a run reports (MaxVio), against hand-computed loads."""

import torch

from titan_dsv4.components.load_balance import learned_routing_moes, update_expert_bias
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
from titan_dsv4.models.deepseek_v4.parallelize import apply_activation_checkpointing


def test_max_violation_and_bias_step_from_known_loads():
    """Debug model (4 layers, the first hash-routed, 1 MTP depth, 8 experts) behind checkpoint wrappers:
    loads set by hand; each learned-routing MoE reports max / mean - 1 under its bare name, the hash layer
    none; every bias moves by ``speed`` towards the mean; the counters restart from zero."""
    model = DeepseekV4Model(FLAVORS["debugmodel"])
    apply_activation_checkpointing(model, "full")
    experts = model.args.n_routed_experts
    assert experts == 8
    loads = {
        "layers.0": torch.arange(8.0),  # hash-routed: not reported
        "layers.1": torch.tensor([6.0, 2, 0, 0, 0, 0, 0, 0]),  # mean 1: 6 / 1 - 1
        "layers.2": torch.full((8,), 3.0),  # perfectly balanced
        "layers.3": torch.zeros(8),  # no tokens: 0, not nan
        "mtp.0": torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 9]),  # mean 2: 9 / 2 - 1
    }
    gates = {"layers.0": model.layers["0"], "layers.1": model.layers["1"], "layers.2": model.layers["2"],
             "layers.3": model.layers["3"], "mtp.0": model.mtp["0"]}
    for name, block in gates.items():
        block.ffn.gate.expert_load.copy_(loads[name])

    violations = update_expert_bias([model], 0.5, None)

    assert list(violations) == learned_routing_moes(model.args) == ["layers.1", "layers.2", "layers.3", "mtp.0"]
    assert {k: float(v) for k, v in violations.items()} == {"layers.1": 5.0, "layers.2": 0.0, "layers.3": 0.0,
                                                            "mtp.0": 3.5}
    assert model.layers["1"].ffn.gate.bias.tolist() == [-0.5, -0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert model.layers["2"].ffn.gate.bias.tolist() == [0.0] * 8
    assert model.mtp["0"].ffn.gate.bias.tolist() == [0.5] * 7 + [-0.5]
    assert all(float(block.ffn.gate.expert_load.abs().sum()) == 0 for block in gates.values())


def test_a_forward_counts_top_k_tokens_per_moe():
    """What the reported balance is computed from: one training forward adds ``tokens x top-k`` to every
    MoE's load (each token to ``k`` distinct experts), and a violation stays within ``[0, E / k - 1]``."""
    model = DeepseekV4Model(FLAVORS["debugmodel"])
    model.init_weights(0)
    model.train()
    ids = torch.randint(0, model.args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    model(ids)
    k, experts = model.args.num_experts_per_tok, model.args.n_routed_experts
    for block in [*model.layers.values(), *model.mtp.values()]:
        assert float(block.ffn.gate.expert_load.sum()) == 2 * 32 * k
    for violation in update_expert_bias([model], 0.0, None).values():
        assert 0.0 <= float(violation) <= experts / k - 1
