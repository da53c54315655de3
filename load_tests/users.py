"""The simulated clients of the load scenarios.

Traffic of a :class:`SteadyUser` (relative weights): prediction only 3, SWAG_I+G 3,
Jitter-CAM 2 on the image model, and SWAG-V_I+G on a clip of the video model 1.
:class:`AnomalousUser` adds out-of-distribution images (held-out Fashion-MNIST classes and
unseen photographs) as about a third of its calls; :class:`MalformedUser` adds corrupt,
oversize and out-of-range requests as about a tenth, each expected to be refused with its
documented status code.
"""

from __future__ import annotations

import functools
import random

from locust import between, events, task

from explainserve.client import build_request
from explainserve.data import FashionScenes, MovingFashion

from .grpc_user import GrpcUser
from .payloads import malformed_requests

IMAGE_SIDE = 64  # FashionScenes pixels; the gateway resizes to the model's input size


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--image-model", default="demo_image", help="image model name in TorchServe")
    parser.add_argument("--video-model", default="demo_video", help="video model name ('' for no clip traffic)")
    parser.add_argument("--n-classes", type=int, default=8, help="class count of the image model")


@functools.cache
def scenes(split: str, size: int):
    """uint8 images (N, 64, 64, 3) of a FashionScenes split, generated once per process."""
    return FashionScenes(split, seed=1, size=size, image_size=IMAGE_SIDE).batch().images


@functools.cache
def clips(size: int):
    """uint8 clips (N, 16, 64, 64, 3) of MovingFashion's test split."""
    return MovingFashion("test", seed=1, size=size, image_size=IMAGE_SIDE).batch().clips


class SteadyUser(GrpcUser):
    """Normal traffic: in-distribution images and clips, each user thinking 0.1-0.5 s between calls."""

    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        super().on_start()
        options = self.environment.parsed_options
        self.image_model, self.video_model = options.image_model, options.video_model
        self.images = scenes("test", 32)

    def image(self):
        return self.images[random.randrange(len(self.images))]

    @task(3)
    def predict(self) -> None:
        self.explain("predict", build_request(self.image(), model=self.image_model))

    @task(3)
    def swag_i_g(self) -> None:
        self.explain("swag_i_g", build_request(self.image(), model=self.image_model, methods=["swag_i_g"]))

    @task(2)
    def jitter_cam(self) -> None:
        self.explain("jitter_cam", build_request(self.image(), model=self.image_model, methods=["jitter_cam"]))

    @task(1)
    def clip(self) -> None:
        if self.video_model:
            pool = clips(4)
            clip = pool[random.randrange(len(pool))]
            self.explain("clip swag_v_i_g", build_request(clip, model=self.video_model, methods=["swag_v_i_g"]))


class AnomalousUser(SteadyUser):
    """Steady traffic plus out-of-distribution images (about a third of the calls)."""

    @task(4)
    def ood(self) -> None:
        split = random.choice(("ood_classes", "ood_backgrounds"))
        pool = scenes(split, 16)
        self.explain(f"ood {split}", build_request(pool[random.randrange(len(pool))], model=self.image_model,
                                                   methods=["swag_i_g"]))


class MalformedUser(SteadyUser):
    """Steady traffic plus malformed requests (about a tenth of the calls)."""

    def on_start(self) -> None:
        super().on_start()
        self.malformed = malformed_requests(self.image_model, self.images[0], self.environment.parsed_options.n_classes)

    @task(1)
    def bad(self) -> None:
        case = random.choice(self.malformed)
        self.explain(f"bad: {case.name}", case.request, expect=case.code)
