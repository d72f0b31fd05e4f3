"""CIFAR-10 found, checked and read as uint8 tensors; batches and augmentation on the device."""
