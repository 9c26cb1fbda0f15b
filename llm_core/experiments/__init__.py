"""Several trainings compared: sweeps (variants of a profile under one MLflow parent run), scaling
fits over them, and the memory and time planner (`scratchllm plan`)."""
