"""Repeatable tools a user runs on their own machine (step time, refresh cost and memory,
checkpoint checksums, the DTensor step, the GPU check); each is also a script."""
