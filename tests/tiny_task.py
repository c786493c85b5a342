"""The tiny classification task that the training tests and their subprocess jobs
(`fault_job.py`, `multihost_job.py`) share. The jobs run as `python tests/JOB.py`, so this
folder is on their path, as it is on pytest's."""
import numpy as np

from jaxvision.pipelines import augment, sources


def tiny_source(n=40, seed=0):
    """`n` uint8 images [8, 8, 3] of 4 classes; learnable: the class sets the mean brightness."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = np.clip(rng.normal(60 * labels[:, None, None, None], 20, (n, 8, 8, 3)), 0, 255)
    return sources.ArraySource(images.astype(np.uint8), labels, num_classes=4, name="tiny")


def preprocess(images, *, key, train):
    """uint8 [B, H, W, C] -> float32, normalised; randomly flipped when training."""
    x = augment.normalize(images, mean=0.5, std=0.25)
    return augment.random_flip(x, key=key) if train else x
