"""The training and comparison harness (``sophia train``, ``sophia compare``) on top of the library."""
