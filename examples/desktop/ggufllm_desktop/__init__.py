"""An example desktop app over ggufllm's public API (see ../README.md)."""
