"""registered_model and hf_export: registered versions and their aliases, the pyfunc MLflow serves,
the model card, text generation from a model directory, and the Hugging Face export."""
