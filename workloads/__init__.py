"""clorch workloads: the science in plain PyTorch (never imports ray or mlflow)."""
