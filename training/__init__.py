"""Training on drpipe shards. This module imports no TensorFlow: the CLI checks a command
line against it before paying the seconds TensorFlow takes to import.

Imports inside functions, in this package, are there only to defer TensorFlow / Keras
(seconds), matplotlib or OpenCV to the commands that use them, or to break an import cycle
(said where it is one); everything else is imported at the top of its module. Layout of a
run directory: training.runs; a run's configuration: training.config."""

MODEL_NAMES = (
    "resnetv2-small", "cnn-small",
    "resnet50", "resnet101", "resnet152", "resnet50v2", "resnet101v2", "resnet152v2",
    "vgg16", "mobilenetv2", "inceptionv3", "densenet121", "xception",
    "efficientnetv2b0", "efficientnetv2s",
    *(f"efficientnetb{k}" for k in range(8)),
)


class WeightsUnavailable(RuntimeError):
    """ImageNet weights cannot be had (offline, or none exist for this network)."""
