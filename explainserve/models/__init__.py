"""Demo models (trained on FashionScenes / MovingFashion), loading of user torchvision weights, and
serving a one-logit classifier as two classes."""

from .architectures import DEMO_ARCHITECTURES, FashionVGG, FashionVGG512, MotionC3D
from .demo import load_demo_model
from .one_logit import served_as_two_classes
from .torchvision_weights import load_torchvision_weights, supported_architectures
from .training import RECIPES, train_demo

__all__ = [
    "DEMO_ARCHITECTURES", "FashionVGG", "FashionVGG512", "MotionC3D", "RECIPES",
    "load_demo_model", "load_torchvision_weights", "served_as_two_classes", "supported_architectures",
    "train_demo",
]
