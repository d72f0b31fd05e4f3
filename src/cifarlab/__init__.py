"""cifarlab: train and understand a small CIFAR-10 CNN, one config change at a time."""
