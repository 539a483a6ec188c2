import pytest
import torch
import torchvision


@pytest.fixture(scope="session")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=9).eval()


@pytest.fixture(scope="session")
def resnet34():
    torch.manual_seed(1)
    return torchvision.models.resnet34(num_classes=9).eval()


@pytest.fixture
def batch():
    torch.manual_seed(2)
    return torch.randn(3, 3, 64, 64)
