"""The OpenAI-compatible HTTP front end. It knows nothing of tensors: the engine runs in its own process."""
