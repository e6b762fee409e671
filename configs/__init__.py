"""Sweep configs shipped with peftbench (``peftbench run quickstart``)."""
