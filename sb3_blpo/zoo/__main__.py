"""``python -m sb3_blpo.zoo``: the same as the ``sb3-blpo-zoo`` command."""

from sb3_blpo.zoo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
