import math

import torch

from labelfoundry.uncertainty import image_scores, js_divergence, member_variance


def test_js_zero_when_members_agree():
    p = torch.tensor([[0.7, 0.2, 0.1]] * 4)
    assert js_divergence(p).item() == 0.0


def test_js_hand_computed_two_members():
    # members [1,0] and [0,1]: H(mean)=ln2, mean H=0 -> JS = ln 2
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert math.isclose(js_divergence(p).item(), math.log(2), rel_tol=1e-5)
    # members [0.5,0.5] and [1,0]: mean=[.75,.25]; H(mean)=-(.75ln.75+.25ln.25); mean H = ln2/2
    q = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    expect = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) - math.log(2) / 2
    assert math.isclose(js_divergence(q).item(), expect, rel_tol=1e-5)


def test_js_batched_shape():
    p = torch.rand(3, 5, 4, 6).softmax(-1)  # (N, P, M, K)
    assert js_divergence(p).shape == (3, 5)


def test_variance_hand_computed():
    v = torch.tensor([[1.0, 10.0], [3.0, 10.0]])  # members x channels
    # channel 0: values 1,3 -> var 1; channel 1: var 0 -> mean 0.5
    assert math.isclose(member_variance(v).item(), 0.5)


def test_image_scores_sum_and_top10():
    u = torch.zeros(1, 10, 10)
    u[0, 0, :10] = 1.0  # 10 of 100 pixels
    s, top = image_scores(u)
    assert s.item() == 10.0 and top.item() == 1.0
