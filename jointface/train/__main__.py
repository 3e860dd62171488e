"""``python -m jointface.train ARGS`` = ``jointface train ARGS``, so that ``torchrun --nproc_per_node N -m
jointface.train --config ... --data ... --out ...`` runs data-parallel training (see :mod:`.distributed`)."""

import sys

from cli.app import app

if __name__ == "__main__":
    app(args=["train", *sys.argv[1:]], prog_name="jointface train")
