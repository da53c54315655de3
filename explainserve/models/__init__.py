"""Demo models (trained on FashionScenes / MovingFashion) and loading of user torchvision weights."""

from .architectures import DEMO_ARCHITECTURES, FashionVGG, FashionVGG512, MotionC3D
from .demo import load_demo_model
from .torchvision_weights import load_torchvision_weights, supported_architectures
from .training import RECIPES, train_demo

__all__ = [
    "DEMO_ARCHITECTURES", "FashionVGG", "FashionVGG512", "MotionC3D", "RECIPES",
    "load_demo_model", "load_torchvision_weights", "supported_architectures", "train_demo",
]
