"""The training and comparison harness (``sophia train``, ``sophia compare``)."""
