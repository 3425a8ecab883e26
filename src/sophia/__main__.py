"""``python -m sophia ...`` runs the ``sophia`` command (also under ``torchrun -m sophia``)."""

from sophia.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
