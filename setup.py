"""Maps the top-level folders to import names under `shoal` (see pyproject.toml)."""

from setuptools import find_packages, setup

FOLDERS = {"shoal.runtime": "runtime", "shoal.operator": "operator", "shoal.e2e": "e2e"}

package_dir = {"shoal": "shoal", **FOLDERS}
packages = ["shoal"]
for name, folder in FOLDERS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(
    packages=packages,
    package_dir=package_dir,
    # C++ sources of the CPU kernels, compiled on first use (runtime/layers/cpu_kernels.py,
    # runtime/kernels/lora_cpu.py), and the migration service's .proto next to its stubs.
    package_data={
        "shoal.runtime.layers": ["csrc/*.cpp"],
        "shoal.runtime.kernels": ["*.cpp"],
        "shoal.runtime.migration": ["*.proto"],
    },
)
