"""Detection data: `coco` reads any COCO-format folder; `builtin` generates the JobSpec's builtin
datasets (`synthetic`: shapes, `scenes`: scenes) on the machinery they share in `generator`.

Nothing is re-exported so that `python -m tid_core.data.synthetic` (and anything needing only
the generator) does not import torch.
"""
