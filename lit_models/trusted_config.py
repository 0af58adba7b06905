"""A config stored inside an artifact (checkpoint, run folder, exported bundle) is data: it is
rebuilt only through effvid's own builders.

Hydra's `instantiate` calls whatever `_target_` names, so a checkpoint whose config says
`_target_: numpy.save` (or `builtins.open` behind `_partial_`, or `os.system`) would run that
callable on load. Every loader of an artifact's config goes through `instantiate_trusted`,
which first walks the whole (resolved) config and refuses any `_target_` outside an
allow-list: the targets effvid's shipped configs name (`experiments/conf/**/*.yaml`) plus
`EXTRA_TRUSTED`. It is deliberately not a package-prefix rule: a project function that writes
files must not become callable because it lives in the project.

A user's own classes are trusted only when the user names them for this process, never by
the artifact: `trust_targets='[my_pkg.MyNet]'` on the effvid-train / effvid-sample command
line, `--trust-target my_pkg.MyNet` for effvid-data, or `EFFVID_TRUSTED_TARGETS=my_pkg.MyNet`
(comma- or space-separated) in the environment.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from importlib import resources
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

TRUSTED_TARGETS_ENV = "EFFVID_TRUSTED_TARGETS"

# Targets a run may name that no shipped config file spells out: the noise schedules and
# optimizers the README suggests swapping in with an override.
EXTRA_TRUSTED = frozenset({
    "diffusers.DDIMScheduler",
    "diffusers.DPMSolverMultistepScheduler",
    "diffusers.EulerDiscreteScheduler",
    "diffusers.LCMScheduler",
    "diffusers.UniPCMultistepScheduler",
    "torch.optim.Adam",
    "torch.optim.SGD",
    # Paradigm targets of run configs written before paradigms became objectives of one module.
    "lit_models.text_to_video.TextToVideo",
    # The EMA callback of run configs written before experiments.weight_averaging.ForeachEMA.
    "lightning.pytorch.callbacks.EMAWeightAveraging",
})

_command_line_targets: set[str] = set()


class UntrustedConfigError(ValueError):
    """An artifact's config names a callable effvid does not build from artifacts."""


def _targets_in(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node["_target_"]
        for value in node.values():
            yield from _targets_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets_in(value)


@functools.cache
def trusted_targets() -> frozenset[str]:
    """Every `_target_` of effvid's shipped configs, plus `EXTRA_TRUSTED`."""
    import yaml

    found: set[str] = set()
    pending = [resources.files("experiments.conf")]
    while pending:
        folder = pending.pop()
        for entry in folder.iterdir():
            if entry.is_dir():
                pending.append(entry)
            elif entry.name.endswith(".yaml"):
                found.update(_targets_in(yaml.safe_load(entry.read_text(encoding="utf-8"))))
    return frozenset(found | EXTRA_TRUSTED)


def parse_target_names(value: str | Iterable[str] | None) -> frozenset[str]:
    """Names from a comma/space-separated string or a list (e.g. a Hydra list override)."""
    if value is None:
        return frozenset()
    items = re.split(r"[\s,]+", value) if isinstance(value, str) else [str(v) for v in value]
    return frozenset(item.strip() for item in items if item and item.strip())


def trust_command_line_targets(names: str | Iterable[str] | None) -> None:
    """Trust these targets for the rest of this process: only a command line calls this,
    with what the user typed (`trust_targets=` / `--trust-target`), never with an
    artifact's value."""
    _command_line_targets.update(parse_target_names(names))


def user_trusted_targets() -> frozenset[str]:
    """What the user opted into: `EFFVID_TRUSTED_TARGETS` and this command line."""
    return parse_target_names(os.environ.get(TRUSTED_TARGETS_ENV)) | frozenset(_command_line_targets)


def _key_path(prefix: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else str(key)


def _walk(node: Any, path: str) -> Iterable[tuple[str, Any]]:
    """(key path, value) of every leaf and every `_target_`, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, _key_path(path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, _key_path(path, index))
    else:
        yield path, node


def _refusal(where: str, path: str, value: Any) -> UntrustedConfigError:
    return UntrustedConfigError(
        f"{where}: {path} = {value} is not one of effvid's builders, so it is not called. "
        f"A config inside a checkpoint or run folder is data. If you trust this artifact's code, "
        f"allow the target for this command: trust_targets='[{value}]' (effvid-train, effvid-sample), "
        f"--trust-target {value} (effvid-data) or {TRUSTED_TARGETS_ENV}={value}"
    )


def _is_target(path: str) -> bool:
    return path == "_target_" or path.endswith("._target_")


def check_trusted(config: Any, where: str, extra: Iterable[str] = ()) -> None:
    """Refuse `config` (a DictConfig, ListConfig, dict or list; a node of a bigger config keeps
    its key path) if any `_target_` in it, after resolving interpolations, is not trusted.

    `where` names the artifact in the message (e.g. the checkpoint path). A string that still
    holds `${...}` after resolution is refused too: Hydra would resolve it a second time
    (an escaped `\\${oc.create:...}` can smuggle a node with a `_target_`). So is a config whose
    interpolations cannot be resolved: what they would produce cannot be checked."""
    if not isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.create(config)
    prefix = config._get_full_key(None) or ""
    allowed = trusted_targets() | user_trusted_targets() | parse_target_names(extra)
    # Targets spelled out literally first: their refusal names them even if resolving fails.
    for path, value in _walk(OmegaConf.to_container(config, resolve=False), prefix):
        if _is_target(path) and not (isinstance(value, str) and ("${" in value or value in allowed)):
            raise _refusal(where, path, value)
    try:
        resolved = OmegaConf.to_container(config, resolve=True)
    except Exception as error:  # noqa: BLE001 - any resolution failure: cannot be checked
        raise UntrustedConfigError(f"{where}: cannot resolve the config to check it ({error})") from None
    for path, value in _walk(resolved, prefix):
        if _is_target(path):
            if not isinstance(value, str) or value not in allowed:
                raise _refusal(where, path, value)
        elif isinstance(value, str) and "${" in value:
            raise UntrustedConfigError(
                f"{where}: {path} still holds an interpolation after resolving ({value!r}), which Hydra "
                "would resolve again; refusing it"
            )


def instantiate_trusted(config: Any, where: str, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate(config, **kwargs)` after `check_trusted(config, where)`.
    `kwargs` are the caller's own objects (e.g. `net=`) and are not checked."""
    from hydra.utils import instantiate

    check_trusted(config, where)
    return instantiate(config, **kwargs)
