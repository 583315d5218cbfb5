"""Starts the example desktop app: ``python examples/desktop/app.py [--model FILE.gguf]``."""

from ggufllm_desktop.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
