"""``python -m ggufllm.cli`` runs the ``ggufllm`` command."""

from . import main

main()
