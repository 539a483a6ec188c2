"""The model-parameter randomisation check (Adebayo et al., 2018)."""

import pytest
import torch
import torchvision

from gradcam_tut.sanity import cascading_randomization, randomization_steps, spearman


def test_steps_top_down(resnet18, tiny_learner):
    assert [n for n, _ in randomization_steps(resnet18)] == [
        "fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    assert [n for n, _ in randomization_steps(tiny_learner.model)] == [
        "head", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]


@pytest.mark.slow
def test_maps_change_as_the_weights_go(resnet18, batch):
    before = [p.clone() for p in resnet18.parameters()]
    table, maps = cascading_randomization(resnet18, batch, "layer3", targets=[0, 5, 8])
    assert list(table.index) == ["trained", "fc", "layer4", "layer3", "layer2", "layer1",
                                 "bn1", "conv1"]
    assert table.loc["trained", "spearman"] == 1
    assert table.loc["fc", "spearman"] < 0.99  # a new head: the gradient changes the map
    assert table["spearman"].iloc[-1] < 0.5  # nothing learned left
    assert maps["conv1"].shape == (3, 64, 64)
    assert all(torch.equal(p, q) for p, q in zip(before, resnet18.parameters()))  # a copy


def test_spearman():
    a = torch.arange(16.0).reshape(4, 4)
    assert spearman(a, a ** 3) == 1 and spearman(a, -a) == -1 and spearman(a, a * 0) == 0


@pytest.mark.slow
def test_the_model_keeps_its_mode(batch):
    model = torchvision.models.resnet18(num_classes=9).train()
    model.bn1.eval()  # a frozen BatchNorm
    cascading_randomization(model, batch, "layer4")
    assert model.training and not model.bn1.training


@pytest.mark.slow
def test_every_layer_at_once_equals_one_layer_at_a_time(resnet18, batch):
    from gradcam_tut.sanity import randomization_by_layer

    table = randomization_by_layer(resnet18, batch, ["layer2", "layer4"], targets=[0, 5, 8])
    assert list(table.columns) == ["layer2", "layer4"] and table.index[0] == "trained"
    for layer in ("layer2", "layer4"):
        one, _ = cascading_randomization(resnet18, batch, layer, targets=[0, 5, 8])
        assert table[layer].tolist() == one["spearman"].tolist()
