"""gmem: GAN memory with no forgetting, as a kernel library and a system.

`pip install --no-build-isolation .` (build isolation would download a torch of its own).
"""
from setuptools import find_packages, setup

setup(
    name="gmem",
    version="0.1.0",
    description="GAN memory with no forgetting: fused modulated conv/linear ops and the memory system",
    packages=find_packages(include=["gmem", "gmem.*", "gmem_kernels", "gmem_kernels.*"]),
    python_requires=">=3.10",
    # The GPU machine has torch 2.11, this one 2.14.1: the exact versions tested live in constraints.txt.
    install_requires=["torch>=2.6,<2.16", "numpy", "safetensors", "tqdm", "pillow"],
    extras_require={"fid": ["pytorch-fid", "scipy"], "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["gmem=gmem.cli:main"]},
    include_package_data=True,
    package_data={"gmem": ["assets/*", "assets/**/*"]},
)
