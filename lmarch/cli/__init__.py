"""The ``lmarch`` command line."""
