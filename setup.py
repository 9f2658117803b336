"""Builds the package; the C++/CUDA extension is added by the cpp backend work."""

from setuptools import setup

setup()
