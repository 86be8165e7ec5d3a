"""TID training core: Task Integration Distillation for torchvision one-stage detectors.

This package's top level and `tid_core.spec` import only pydantic and the standard library, so
the API can validate job specs without importing torch.
"""
