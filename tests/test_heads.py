"""Every registered head through the same interface: forward, loss, backward, predict, targets."""

import numpy as np
import pytest
import torch

from waterdrop.model.head import mixed_terms
from waterdrop.registry import registered_heads

CHANNELS = [8, 16, 32]
LABELS = ["a", "b", "c"]


def _feats(n):
    return [torch.randn(n, c, 8 // (i + 1), 8 // (i + 1)) for i, c in enumerate(CHANNELS)]


@pytest.mark.parametrize("name", sorted(registered_heads()))
def test_every_head_forward_backward_predict(name):
    head_class = registered_heads()[name]
    head = head_class(CHANNELS, LABELS, "normal")
    names = {"multilabel": [[], ["a"], ["b", "c"], ["c"]], "graded": [["a"], ["b"], ["c"], ["a"]]}.get(
        head.kind, [["normal"], ["a"], ["b"], ["c"]])
    target = torch.from_numpy(np.stack([head.encode_target(n, []) for n in names]))
    feats = _feats(len(names))
    outputs = head(feats)
    losses = head.loss(outputs, target)
    assert all(v.shape == (len(names),) for v in losses.values()), "loss terms are per sample"
    assert all("loss" in term for term in losses), "mmengine optimises only terms named *loss*"
    total = sum(v.mean() for v in losses.values())
    assert torch.isfinite(total)
    total.backward()
    untouched = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not untouched, f"no gradient reaches {untouched}"
    predictions = head.predict(outputs)
    assert predictions["prob"].shape[0] == len(names)
    assert all(((v >= 0) & (v <= 1)).all() for v in predictions.values())
    scores, truth = head.score_and_truth({k: v.detach().numpy() for k, v in predictions.items()}, target.numpy())
    assert len(scores) == len(truth) == len(names)


@pytest.mark.parametrize("name", sorted(registered_heads()))
def test_every_head_rejects_unknown_labels_and_bad_args(name):
    head_class = registered_heads()[name]
    head = head_class(CHANNELS, LABELS, "normal")
    with pytest.raises(ValueError, match="unknown label 'zebra'"):
        head.encode_target(["zebra"], [])
    if "dropout" in head_class.config_args():
        with pytest.raises(ValueError, match="dropout"):
            head_class(CHANNELS, LABELS, "normal", dropout=1.5)


def test_binary_head_probability_is_one_minus_normal():
    head = registered_heads()["BinaryHead"](CHANNELS, LABELS, "normal", loss="subclass_softmax")
    predictions = head.predict(head(_feats(4)))
    assert torch.allclose(predictions["prob"], predictions["subclass_prob"].sum(1), atol=1e-6)
    assert head.encode_target(["normal"], []) == 0 and head.encode_target(["c"], []) == 3
    assert head.encode_target([], []) == 0  # [] is a normal image
    with pytest.raises(ValueError, match="expected one label"):
        head.encode_target(["a", "b"], [])


def test_multilabel_missing_labels_are_masked_out_of_the_loss():
    head = registered_heads()["MultiLabelHead"](CHANNELS, LABELS, "none")
    target = torch.from_numpy(head.encode_target(["a"], ["b"]))[None]
    assert target.tolist() == [[1, -1, 0]]
    outputs = {"logits": torch.tensor([[0.0, 50.0, 0.0]], requires_grad=True)}
    loss = head.loss(outputs, target)["loss_cls"]
    loss.backward()
    # the confident "b" logit would cost a lot as a negative; masked, it costs nothing
    assert outputs["logits"].grad[0, 1] == 0
    assert loss.item() == pytest.approx(np.log(2), abs=1e-5)


def test_a_loss_term_mmengine_would_not_optimise_is_an_error():
    head = registered_heads()["BinaryHead"](CHANNELS, LABELS, "normal")
    outputs, target = head(_feats(2)), torch.tensor([0, 1])
    head.loss = lambda out, tgt: {"aux_cls": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"BinaryHead.loss returned terms \['aux_cls'\].*logged but never optimised"):
        mixed_terms(head, outputs, target, None)
