"""Adds csrc/ to the package as calibrl_kernels._csrc (all other metadata is in pyproject.toml)."""
from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_csrc(build_py):
    def finalize_options(self):
        super().finalize_options()
        if "calibrl_kernels._csrc" not in self.packages:
            self.packages.append("calibrl_kernels._csrc")
        self.package_dir["calibrl_kernels._csrc"] = "csrc"
        self.package_data.setdefault("calibrl_kernels._csrc", ["*.cpp", "*.h"])


setup(cmdclass={"build_py": build_py_with_csrc})
