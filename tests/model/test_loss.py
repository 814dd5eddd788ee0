"""Triplet ranking loss and prominence supervision on hand-built inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from cpfean.model import ContrastiveLoss, prominence_loss

from .conftest import batch_recurrence_targets as recurrence_targets

SIMS = torch.tensor(
    [
        [0.9, 0.5, 0.1],
        [0.3, 0.8, 0.75],
        [0.35, 0.6, 0.4],
    ]
)


@pytest.mark.parametrize(("max_violation", "expected"), [(True, 1.10), (False, 1.25)])
def test_triplet_loss_known_answer(max_violation, expected):
    loss = ContrastiveLoss(margin=0.2, max_violation=max_violation)(SIMS)
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_captions_of_the_same_image_are_not_negatives():
    sims = torch.tensor(
        [
            [0.9, 0.95, 0.1, 0.2],
            [0.85, 0.7, 0.3, 0.1],
            [0.2, 0.1, 0.8, 0.5],
            [0.1, 0.2, 0.3, 0.6],
        ]
    )
    loss_fn = ContrastiveLoss(margin=0.2, max_violation=True)
    torch.testing.assert_close(loss_fn(sims), torch.tensor(1.3))
    torch.testing.assert_close(
        loss_fn(sims, image_ids=torch.tensor([0, 0, 1, 2])), torch.tensor(0.1)
    )


def test_non_square_batch_with_caption_image_ids():
    sims = torch.tensor([[0.9, 0.6, 0.5, 0.2], [0.3, 0.4, 0.7, 0.8]], requires_grad=True)
    loss = ContrastiveLoss(margin=0.2)(
        sims, image_ids=torch.tensor([7, 9]), caption_image_ids=torch.tensor([7, 7, 9, 9])
    )
    torch.testing.assert_close(loss, torch.tensor(0.1))
    loss.backward()
    # only the violating triplet (image 7, caption 1, hardest negative caption 2) moves
    expected = torch.zeros(2, 4)
    expected[0, 1], expected[0, 2] = -1.0, 1.0
    torch.testing.assert_close(sims.grad, expected)


def test_loss_with_every_caption_positive_is_finite():
    sims = torch.rand(2, 2, requires_grad=True)
    loss = ContrastiveLoss()(sims, image_ids=torch.tensor([3, 3]))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(sims.grad).all()


def test_recurrence_targets_and_prominence_loss():
    token_ids = torch.tensor([[5, 6, 7], [5, 8, 0], [9, 6, 4]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    targets = recurrence_targets(token_ids, mask, torch.tensor([0, 0, 1]))
    # "5" recurs within image 0 and nowhere else; "6" occurs in another image's caption too
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 0]]))
    log_p = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.8, 0.0], [0.3, 0.3, 0.4]]).log()
    loss = prominence_loss(log_p, targets)
    # summed over the captions that have a target, like the triplet loss
    torch.testing.assert_close(loss, torch.tensor(-math.log(0.5) - math.log(0.2)))
    assert prominence_loss(log_p, torch.zeros(3, 3)).item() == 0


def test_prominence_loss_is_the_divergence_from_the_targets():
    """0 when the prominence equals the normalised targets; else KL(q || p), by hand."""
    targets = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    log_q = torch.tensor([[0.5, 0.25, 0.25, 1e-30]]).log()
    torch.testing.assert_close(prominence_loss(log_q, targets), torch.tensor(0.0))
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    expected = (0.5 * math.log(0.5 / 0.25)) + 2 * (0.25 * math.log(0.25 / 0.25))
    torch.testing.assert_close(prominence_loss(p.log(), targets), torch.tensor(expected))
