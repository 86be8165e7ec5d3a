"""Detection data: `coco` reads any COCO-format folder, `synthetic` generates one.

Nothing is re-exported so that `python -m tid_core.data.synthetic` (and anything needing only
the generator) does not import torch.
"""
