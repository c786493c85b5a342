"""jaxvision: the CS231n curriculum as composable JAX/Flax functions.

The modules, each importable on its own:
  config      experiment configs, command-line overrides, validation
  pipelines   sources (tfds, image folders/archives, arrays, digits), loaders, augmentation
  nets        one file per net family; each net returns (logits, named activations)
  losses      per-example losses and metrics, masked means
  optim       learning-rate schedules and the optimizer chain
  train       train state, train/eval steps, evaluation
  loop        the one training loop (logging, checkpoints, resume, summary)
  checkpoint  orbax checkpoints with structure checks
  sharding    the device mesh and sharding rules
  plots       learning curves and prediction grids
"""
__version__ = "0.1.0"
