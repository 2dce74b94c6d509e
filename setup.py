"""Build hook (the metadata is in setup.cfg): the zoo configs live once, in ``zoo_hyperparams/`` at the top of the
repository, and wheels carry them as package data in ``sb3_blpo/zoo/hyperparams/``. Editable installs read
``zoo_hyperparams/`` in place (see ``sb3_blpo.zoo.configs.config_path``)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ZOO_CONFIGS = Path(__file__).resolve().parent / "zoo_hyperparams"


class BuildPyWithZooConfigs(build_py):
    """``build_py`` that also copies ``zoo_hyperparams/*.yml`` into the built package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "sb3_blpo" / "zoo" / "hyperparams"
        target.mkdir(parents=True, exist_ok=True)
        configs = sorted(ZOO_CONFIGS.glob("*.yml"))
        if not configs:
            raise RuntimeError(f"no zoo configs found in {ZOO_CONFIGS}; the wheel would ship none")
        for config in configs:
            shutil.copy2(config, target / config.name)


setup(cmdclass={"build_py": BuildPyWithZooConfigs})
