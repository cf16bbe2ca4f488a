"""fmlm lives in root folders (kernels/, engine/, bench/, csrc/) installed under the one namespace `fmlm`."""
from setuptools import setup

setup(
    packages=["fmlm", "fmlm.kernels", "fmlm.engine", "fmlm.bench", "fmlm.csrc"],
    package_dir={"fmlm": "fmlm", "fmlm.kernels": "kernels", "fmlm.engine": "engine", "fmlm.bench": "bench",
                 "fmlm.csrc": "csrc"},
    package_data={"fmlm.engine": ["data/*.gz", "data/*.md"], "fmlm.csrc": ["*.cu", "*.h"]},
)
