"""Chain-of-thought maths (``faithful_train/functional/cot.py``): the area over the early-answering
curve."""

import pytest
import torch

from faithful_train.functional.cot import area_over_curve


def test_area_over_curve():
    # never matches before the full chain: 1 - y = [1, 1, 0] over x = [0, .5, 1] -> 0.75
    assert area_over_curve(torch.tensor([[0.0, 0.0]])).item() == pytest.approx(0.75)
    assert area_over_curve(torch.tensor([[1.0, 1.0]])).item() == 0.0  # the steps never matter
    assert area_over_curve(torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.25)
