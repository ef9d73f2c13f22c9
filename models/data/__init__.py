"""Training data: the video and synthetic sources, their on-disk layout, the pair dataset.

`models.data.dataset` needs PyTorch; the other modules do not.
"""
