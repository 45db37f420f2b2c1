"""Loss normalisation checked by hand on a tiny example with ignored tokens and MTP. The logits are given:
the fused head (``head_loss``) runs with an identity head weight, so its hidden states are the logits."""

import math

import torch

from titan_dsv4.components.loss import MTPLoss, build_targets, summarise_parts
from titan_dsv4.models.deepseek_v4.head_loss import head_loss


def model_outputs(logits, targets, scaling_factor: float):
    """What the model's last stage returns for these logits (main first, then each MTP depth)."""
    logits = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    num_mtp = len(logits) - 1
    weights = [1.0] + [scaling_factor / max(num_mtp, 1)] * num_mtp
    return head_loss(logits, torch.eye(logits[0].shape[-1]), targets, weights)


def ce(logits_row, target):
    return -logits_row[target] + math.log(sum(math.exp(v) for v in logits_row))


def test_hand_computed_objective_and_parts():
    # one sequence of 3 positions, vocab 2; main position 2 ignored; depth-0 position 1 and 2 ignored
    main = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [5.0, 5.0]]])
    depth0 = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    targets = torch.tensor([[[1, 0], [0, -100], [-100, -100]]])
    loss_fn = MTPLoss()
    main_sum = ce([0.0, 1.0], 1) + ce([2.0, 0.0], 0)
    mtp_sum = ce([1.0, 0.0], 0)
    got = loss_fn(model_outputs((main, depth0), targets, 0.5), targets,
                  global_valid_tokens=torch.tensor(4.0))  # 4 = whole global batch
    assert math.isclose(got.item(), (main_sum + 0.5 * mtp_sum) / 4, rel_tol=1e-6)
    parts = loss_fn.take_parts()
    summary = summarise_parts(parts, 1, 0.5)
    assert math.isclose(summary["loss"], main_sum / 2, rel_tol=1e-6)  # logged: per valid main token
    assert math.isclose(summary["mtp_losses"][0], mtp_sum / 1, rel_tol=1e-6)
    assert summary["mtp_acceptance"] == [1.0]  # argmax of [1, 0] is 0 == target
    assert math.isclose(summary["total_loss"], (main_sum + 0.5 * mtp_sum) / 2, rel_tol=1e-6)


def test_microbatch_losses_sum_to_the_full_batch_loss():
    """Normalising by the global count makes per-microbatch losses add up to the full-batch loss, which is
    what makes summed gradients (pipeline microbatches, data-parallel ranks) equal the single-process ones."""
    torch.manual_seed(0)
    logits = [torch.randn(4, 6, 11) for _ in range(3)]
    labels = torch.randint(0, 11, (4, 6))
    labels[0, :3] = -100
    positions = torch.arange(6).expand(4, 6)
    targets = build_targets(labels, positions, num_mtp=2)
    loss_fn = MTPLoss()
    n = (labels != -100).sum()
    full = loss_fn(model_outputs(logits, targets, 0.3), targets, n)
    halves = sum(loss_fn(model_outputs([x[i:i + 2] for x in logits], targets[i:i + 2], 0.3), targets[i:i + 2], n)
                 for i in (0, 2))
    torch.testing.assert_close(full, halves)
    parts = loss_fn.take_parts(last=2)  # the stash keeps only what was asked for
    assert parts[1] == n and loss_fn.parts == []


def test_without_mtp_outputs():
    loss_fn = MTPLoss()
    logits, targets = torch.tensor([[[0.0, 3.0]]]), torch.tensor([[[1]]])
    got = loss_fn(model_outputs(logits, targets, 0.3), targets)
    assert math.isclose(got.item(), ce([0.0, 3.0], 1), rel_tol=1e-6)


def test_greedy_acceptance_per_depth_on_a_hand_made_example():
    """Depth k accepts a position when its argmax equals its target; ignored targets do not count."""
    main = torch.zeros(1, 4, 3)
    depth0 = torch.tensor([[[0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 9.0], [9.0, 0.0, 0.0]]])  # 1, 0, 2, 0
    depth1 = torch.tensor([[[0.0, 0.0, 9.0], [0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [9.0, 0.0, 0.0]]])  # 2, 1, 0, 0
    targets = torch.tensor([[[0, 1, 2], [0, 0, 0], [0, 1, -100], [0, -100, -100]]])
    loss_fn = MTPLoss()
    loss_fn(model_outputs((main, depth0, depth1), targets, 0.3), targets)
    summary = summarise_parts(loss_fn.take_parts(), 2, 0.3)
    # depth 0: predictions 1,0,2 vs targets 1,0,1 -> 2 of 3; depth 1: 2,1 vs 2,0 -> 1 of 2
    assert summary["mtp_acceptance"] == [2 / 3, 1 / 2]
