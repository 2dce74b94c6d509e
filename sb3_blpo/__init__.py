import os

from sb3_blpo.blpo import BLPO

__all__ = ["BLPO"]

with open(os.path.join(os.path.dirname(__file__), "version.txt")) as file_handler:
    __version__ = file_handler.read().strip()
