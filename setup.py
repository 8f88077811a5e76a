"""Build script. The C++/CUDA sparse-KL extension is added by the kernel work (csrc/)."""
from setuptools import setup

setup()
