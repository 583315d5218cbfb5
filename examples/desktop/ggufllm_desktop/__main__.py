"""``python -m ggufllm_desktop`` (from examples/desktop)."""

from .launch import main

raise SystemExit(main())
