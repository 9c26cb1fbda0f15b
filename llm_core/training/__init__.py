"""trained_model: the training loop, its optimizers and precision, checkpoints, the batch loader,
training health, a training's bookkeeping (key, run directory, MLflow run) and warm starts."""
