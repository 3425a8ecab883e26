"""Studies and their data: one-off measurements behind docs/WHEN_TO_USE_SOPHIA.md and
experiments/RESULTS.md (curvature and batch-size maps, the training-length ladder, the Sophia-G
diagnosis). Each script runs on its own (`python experiments/<name>.py`)."""
