"""The longer `edgeloop` commands, one module per part of the loop; cloud/cli.py registers
them (the entry points name cloud.cli)."""
