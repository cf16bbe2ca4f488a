"""CUDA C++ sources (torch-free .cu files with a C ABI), shipped as package data; kernels/_cuda.py builds them."""
