"""The data every side reads: the embedded chat corpus, its partition into devices, a device's
train/held-out split, and the public prompts the cloud node distills on.

Kernel code (no Flower, no adapters): the device, the server's audit, the cloud node and the
simulation all draw the same device data from here, so a split is the same wherever it is made.
"""
