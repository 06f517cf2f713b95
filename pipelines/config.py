"""The root configuration and its composition with Hydra.

The root dataclass only assembles the groups each package defines (``training.config``, ``evaluation.gates``,
``registry.config``, ``serving.config``). YAML options in ``pipelines/conf`` extend the registered schemas, and
experiments are overlays (``+experiment=tiny``). Steps pass each library function the sub-config it needs.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from defectops.core.taxonomy import TaskKind
from defectops.evaluation.gates import GateConfig
from defectops.registry.config import RegistryConfig
from defectops.serving.config import DetectConfig, ExportConfig
from defectops.training.config import AnomalyConfig, DataConfig, ModelConfig, TrainConfig

HOME_ENV = "DEFECTOPS_HOME"
DEFAULT_HOME = "defectops-home"


@dataclass
class RunConfig:
    """Run identity. ``id`` defaults to ``<name>-<config hash>``: the same command resumes the same run."""

    name: str = "defectops"
    id: str | None = None


@dataclass
class DefectOpsConfig:
    """The whole configuration: the run's identity, the task it trains (``verify``: AOI candidate verification on
    boards; ``classify``: folder-per-class images; ``anomaly``: an anomaly model fitted on good samples) and one
    sub-config per group."""

    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0
    task: TaskKind = TaskKind.verify
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)


class ConfigError(ValueError):
    """A configuration that cannot be composed or is invalid."""


def _register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=DefectOpsConfig)
    cs.store(group="data", name="base_data", node=DataConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)


def load_config(overrides: list[str] | None = None) -> DefectOpsConfig:
    """Compose ``config.yaml`` with Hydra overrides; errors become one-line :class:`ConfigError`."""
    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="defectops.pipelines.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides or []))
        obj = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        msg = " ".join(str(e).split())
        if isinstance(e.__cause__, OmegaConfBaseException):  # Hydra's "Error merging override" hides the reason
            msg += ": " + " ".join(str(e.__cause__).split("full_key:")[0].split())
        raise ConfigError(f"bad configuration: {msg[:300]} (see `defectops config show --help`)") from None
    finally:
        GlobalHydra.instance().clear()
    assert isinstance(obj, DefectOpsConfig)
    return obj


def to_dict(cfg: DefectOpsConfig) -> dict[str, Any]:
    return asdict(cfg)


def to_yaml(cfg: DefectOpsConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> DefectOpsConfig:
    base = OmegaConf.structured(DefectOpsConfig)
    merged = OmegaConf.merge(base, OmegaConf.create(text))
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, DefectOpsConfig)
    return obj


def config_hash(cfg: DefectOpsConfig) -> str:
    """Hash of everything that changes the result (the ``run`` identity section is excluded)."""
    d = to_dict(cfg)
    d.pop("run", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def run_id(cfg: DefectOpsConfig) -> str:
    return cfg.run.id or f"{cfg.run.name}-{config_hash(cfg)[:10]}"


def home_dir() -> Path:
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def tracking_uri(cfg: RegistryConfig, home: Path) -> str:
    return cfg.tracking_uri or f"sqlite:///{home / 'mlflow.db'}"


def artifact_location(cfg: RegistryConfig, home: Path) -> str | None:
    if cfg.artifact_location:
        return cfg.artifact_location
    return (home / "mlartifacts").as_uri() if not (cfg.tracking_uri or "").startswith("http") else None
