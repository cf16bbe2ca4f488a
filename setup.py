"""fmlm lives in root folders (kernels/, engine/, bench/) installed under the one namespace `fmlm`."""
from setuptools import setup

setup(
    packages=["fmlm", "fmlm.kernels", "fmlm.engine", "fmlm.bench"],
    package_dir={"fmlm": "fmlm", "fmlm.kernels": "kernels", "fmlm.engine": "engine", "fmlm.bench": "bench"},
    package_data={"fmlm.engine": ["data/*.gz", "data/*.md"]},
)
