"""Entry point for `accelerate launch train.py --config configs/<x>.yaml [key=value ...]`."""

import sys

from kontext_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
