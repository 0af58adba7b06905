"""Configs stored in artifacts are data: rebuild from them only through effvid's own targets.

(Placeholder API while the reliability work lands: every `_target_` in a config from an
artifact must be one that effvid's shipped configs name.)
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf


class UntrustedConfigError(ValueError):
    """A config from an artifact names a callable effvid does not build."""


@lru_cache(maxsize=1)
def trusted_targets() -> frozenset[str]:
    import yaml

    conf = Path(__file__).resolve().parent.parent / "experiments" / "conf"
    targets: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                targets.add(node["_target_"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in conf.rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text(encoding="utf-8")))
    return frozenset(targets)


def check_trusted(config: Any, where: str, extra: Iterable[str] = ()) -> None:
    allowed = trusted_targets() | set(extra)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, (DictConfig, dict)):
            items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
            for key, value in items:
                key_path = f"{path}.{key}" if path else str(key)
                if key == "_target_" and str(value) not in allowed:
                    raise UntrustedConfigError(f"{where}: {key_path} = {value} is not a target effvid builds")
                walk(value, key_path)
        elif isinstance(node, (ListConfig, list)):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")

    walk(config, "")


def instantiate_trusted(config: Any, where: str, **kwargs: Any) -> Any:
    check_trusted(config, where)
    return instantiate(config, **kwargs)
