"""The packaged rl-zoo3 configs, and checks of a config entry that turn zoo tracebacks into one clear message.

Nothing here imports rl-zoo3: the checks take the algorithm class and the hyperparameters as arguments.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sb3_blpo.zoo.errors import ZooDependencyError, ZooInputError

#: Short names accepted by ``--conf-file`` for the configs shipped with sb3_blpo, and their file names.
PACKAGED_CONFIGS: dict[str, str] = {
    "blpo": "blpo.yml",
    "blpo_authors": "blpo_authors.yml",
    "ppo_plasticity": "ppo_plasticity.yml",
}

#: Keys of a zoo config entry that rl-zoo3 consumes itself (they never reach the algorithm's constructor).
ZOO_KEYS: tuple[str, ...] = (
    "n_timesteps",
    "n_envs",
    "normalize",
    "env_wrapper",
    "vec_env_wrapper",
    "frame_stack",
    "callback",
    "monitor_kwargs",
    "env_kwargs",
    "noise_type",
    "noise_std",
)

#: Constructor arguments that rl-zoo3 sets from the command line; a config entry must not set them.
RESERVED_KEYS: dict[str, str] = {
    "env": "--env",
    "seed": "--seed",
    "verbose": "--verbose",
    "device": "--device",
    "tensorboard_log": "--tensorboard-log",
    "_init_setup_model": "(internal)",
}

_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = _PACKAGE_DIR.parents[1]


def packaged_config_dir() -> Path:
    """The folder of the configs shipped as package data in a wheel (``sb3_blpo/zoo/hyperparams``, copied there from
    ``zoo_hyperparams/`` at build time by ``setup.py``; absent in a source checkout)."""
    return _PACKAGE_DIR / "hyperparams"


def source_config_dir() -> Path | None:
    """``zoo_hyperparams/`` of the source checkout sb3_blpo is imported from (editable install), else ``None``."""
    folder = _SOURCE_ROOT / "zoo_hyperparams"
    if folder.is_dir() and (_SOURCE_ROOT / "setup.cfg").is_file():
        return folder
    return None


def config_path(name: str) -> Path:
    """
    Path of a config shipped with sb3_blpo.

    In a source checkout (editable install) this is the file in ``zoo_hyperparams/``, the one committed copy; in an
    installed wheel it is the copy the build put in ``sb3_blpo/zoo/hyperparams/``.

    :param name: a key of :data:`PACKAGED_CONFIGS` (``"blpo"``, ``"ppo_plasticity"``) or its file name
    :return: the path of the yaml file
    """
    file_name = PACKAGED_CONFIGS.get(name, name)
    if file_name not in PACKAGED_CONFIGS.values():
        raise ZooInputError(f"unknown packaged config {name!r}; available: {', '.join(PACKAGED_CONFIGS)}")
    candidates = [folder / file_name for folder in (source_config_dir(), packaged_config_dir()) if folder is not None]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(candidate) for candidate in candidates)
    raise ZooInputError(
        f"the packaged config {file_name} was not found (searched {searched}); the installation is incomplete: "
        "reinstall sb3_blpo, or pass a config explicitly with --conf-file PATH"
    )


def resolve_conf_file(value: str) -> str:
    """
    Expand a short name of a packaged config (``--conf-file ppo_plasticity``) to its path; return a file path or an
    importable Python module (rl-zoo3's two other forms) as is, and refuse anything else in one line.

    A file of that name in the working directory takes precedence over the packaged config.

    :param value: the ``--conf-file`` argument
    :return: the argument to pass on to rl-zoo3
    """
    if value in PACKAGED_CONFIGS and not Path(value).exists():
        return str(config_path(value))
    if Path(value).exists():
        return value
    packaged = ", ".join(PACKAGED_CONFIGS)
    if value.endswith((".yml", ".yaml", ".py")) or "/" in value:
        raise ZooInputError(f"--conf-file {value!r}: no such file (packaged configs, by name: {packaged})")
    import importlib.util

    try:
        found = importlib.util.find_spec(value) is not None
    except Exception:  # find_spec imports the parent package: any error in it means "not importable" here
        found = False
    if not found:
        raise ZooInputError(
            f"--conf-file {value!r} is neither a file, a packaged config ({packaged}) nor an importable Python module"
        )
    return value


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """
    Read a zoo yaml config (a mapping from env id, ``"default"`` or ``"atari"`` to a mapping of hyperparameters).

    :param path: the yaml file
    :return: the parsed config
    :raises ZooInputError: when the file is missing, is not valid yaml, or does not have that structure
    """
    try:
        import yaml
    except ImportError as error:  # pragma: no cover - PyYAML comes with rl-zoo3 and optuna
        raise ZooDependencyError(f"reading zoo configs needs PyYAML: {error}") from error
    path = Path(path)
    if not path.is_file():
        raise ZooInputError(f"config file {str(path)!r} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ZooInputError(f"config file {str(path)!r} is not valid yaml: {error}") from error
    if not isinstance(config, dict):
        raise ZooInputError(f"config file {str(path)!r} must map env ids to hyperparameters, got {type(config).__name__}")
    for key, entry in config.items():
        if not isinstance(entry, dict):
            raise ZooInputError(
                f"entry {key!r} of {str(path)!r} must be a mapping of hyperparameters, got {entry!r} ({type(entry).__name__})"
            )
    return config


def select_entry(config: Mapping[str, Any], env_id: str, source: str, is_atari: bool = False) -> str:
    """
    The key rl-zoo3 will use for ``env_id``: the env id itself, then ``"atari"`` for Atari games, then ``"default"``.

    :param config: the parsed config
    :param env_id: the environment id
    :param source: the config's name, for the message
    :param is_atari: whether ``env_id`` is an Atari game
    :return: the selected key
    :raises ZooInputError: when there is neither an entry for ``env_id`` nor a fallback entry
    """
    if env_id in config:
        return env_id
    if is_atari and "atari" in config:
        return "atari"
    if "default" in config:
        return "default"
    close = difflib.get_close_matches(env_id, [str(key) for key in config], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ZooInputError(
        f"no hyperparameters for {env_id!r} in {source} and no 'default' entry.{hint} "
        f"Entries: {', '.join(str(key) for key in config)}. Add an entry '{env_id}:' (or 'default:') to the config, "
        "or pass another one with --conf-file."
    )


def _accepted_arguments(algo_class: type) -> tuple[set[str], set[str], bool]:
    """(keyword arguments, required arguments, whether ``**kwargs`` is accepted) of ``algo_class.__init__``."""
    accepted: set[str] = set()
    required: set[str] = set()
    var_keyword = False
    for parameter in inspect.signature(algo_class).parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            accepted.add(parameter.name)
            if parameter.default is inspect.Parameter.empty:
                required.add(parameter.name)
    return accepted, required, var_keyword


def check_algo_hyperparameters(algo: str, algo_class: type, hyperparams: Mapping[str, Any], source: str) -> None:
    """
    Check the keys that rl-zoo3 will pass to ``algo_class(...)`` after taking its own keys out.

    :param algo: the ``--algo`` name
    :param algo_class: the algorithm class
    :param hyperparams: the preprocessed hyperparameters (zoo keys removed)
    :param source: where they come from (config file and entry), for the message
    :raises ZooInputError: on an unknown key, a key reserved for the command line, or a missing required argument
    """
    accepted, required, var_keyword = _accepted_arguments(algo_class)
    settable = sorted(accepted - set(RESERVED_KEYS))
    # noise_type/noise_std are removed by rl-zoo3 after this check (action-noise preprocessing).
    keys = [key for key in hyperparams if key not in ("noise_type", "noise_std")]
    reserved = [key for key in keys if key in RESERVED_KEYS]
    if reserved:
        flags = ", ".join(f"{key!r} ({RESERVED_KEYS[key]})" for key in reserved)
        raise ZooInputError(f"{source}: {flags} cannot be set in a config; rl-zoo3 sets them from the command line")
    unknown = [] if var_keyword else [key for key in keys if key not in accepted]
    if unknown:
        details = []
        for key in unknown:
            close = difflib.get_close_matches(key, settable + list(ZOO_KEYS), n=1)
            details.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ZooInputError(
            f"{source}: unknown hyperparameter(s) for {algo} ({algo_class.__name__}): {', '.join(details)}. "
            f"Accepted: {', '.join(settable)}; rl-zoo3 keys: {', '.join(ZOO_KEYS)}."
        )
    missing = sorted(required - set(keys) - set(RESERVED_KEYS))
    if missing:
        raise ZooInputError(f"{source}: missing required hyperparameter(s) for {algo}: {', '.join(missing)}")


def _callback_entries(spec: Any) -> Iterable[tuple[Any, Any]]:
    """(name, kwargs) pairs of a zoo ``callback`` value: a name, a ``{name: kwargs}`` mapping, or a list of these."""
    for entry in spec if isinstance(spec, list) else [spec]:
        if isinstance(entry, dict):
            if len(entry) != 1:
                yield entry, None
            else:
                yield next(iter(entry.items()))
        else:
            yield entry, {}


def check_callbacks(spec: Any, source: str) -> None:
    """
    Check a zoo ``callback`` value: each name must import and each keyword must be an argument of the class.

    :param spec: the value of the ``callback`` key
    :param source: where it comes from, for the message
    :raises ZooInputError: on a malformed entry, a name that does not import, or a bad keyword argument
    """
    if spec is None:
        return
    for name, kwargs in _callback_entries(spec):
        if not isinstance(name, str):
            if kwargs is None:
                raise ZooInputError(f"{source}: each callback entry must be a name or {{name: {{kwargs}}}}, got {name!r}")
            continue  # an already constructed callback object (python configs)
        module_name, _, class_name = name.rpartition(".")
        if not module_name:
            raise ZooInputError(
                f"{source}: callback {name!r} must be a dotted path such as sb3_blpo.callbacks.PlasticityMonitor"
            )
        try:
            target = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ZooInputError(f"{source}: callback {name!r} cannot be imported: {error}") from error
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, dict):
            raise ZooInputError(f"{source}: the arguments of callback {name!r} must be a mapping, got {kwargs!r}")
        try:
            inspect.signature(target).bind(**kwargs)
        except TypeError as error:
            raise ZooInputError(f"{source}: bad arguments for callback {name!r}: {error}") from error
        except ValueError:  # pragma: no cover - no signature available (builtins)
            pass


def parse_linear_schedule(key: str, value: str, source: str) -> float:
    """
    The initial value of a zoo schedule string ``"lin_<float>"`` (rl-zoo3's format for ``learning_rate``).

    :param key: the hyperparameter name
    :param value: the string
    :param source: where it comes from, for the message
    :return: the initial value of the linear schedule (it decays to 0 at the end of training)
    :raises ZooInputError: when the string is not of that form
    """
    prefix, _, number = value.partition("_")
    try:
        if prefix != "lin":
            raise ValueError(prefix)
        return float(number)
    except ValueError:
        raise ZooInputError(
            f"{source}: {key} must be a number or a linear schedule 'lin_<initial value>' (e.g. lin_1e-3), got {value!r}"
        ) from None
