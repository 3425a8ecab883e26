"""``python -m sophia_pytorch.harness ...`` runs the ``sophia`` command (also under torchrun)."""

from sophia_pytorch.harness.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
