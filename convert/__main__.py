"""``python -m convert``: the same command as ``ggufllm convert``."""

from ggufllm.cli import convert_command

if __name__ == "__main__":
    convert_command(prog_name="python -m convert")
