"""The ``wsireg`` command line: one click group, each verb a thin layer over the library."""
