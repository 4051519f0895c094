"""Experiment trackers chosen by `train.report_to`: TensorBoard, Weights & Biases, MLflow,
Trackio and the others Accelerate has a tracker class for. They get the resolved config once
and every row of metrics.jsonl, under the same names, at the same steps."""

from __future__ import annotations

from pathlib import Path

from rlhf.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
"""The names `train.report_to` accepts: Accelerate's tracker classes."""
PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet-ml"}


def check_tracker_names(names: list[str]) -> None:
    """`train.report_to` names only trackers of TRACKERS."""
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"train.report_to: expected names among {', '.join(TRACKERS)}, got {unknown[0]!r}")


def _flat(tree: dict) -> dict:
    """A nested config as `section.key` -> bool, int, float or str (what every tracker takes)."""
    from rlhf.config import flat_keys  # config imports this module's TRACKERS

    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat_keys(tree).items()}


class Trackers:
    """The trackers of one run, on the main process. TensorBoard writes its event files under
    `run_dir/tracking/`; on resume it drops the events after the checkpoint's step, as the
    run logs those steps again."""

    def __init__(self, names: list[str], run_dir: Path, config: dict, step: int = 0):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS
        from accelerate.utils import imports

        self.trackers = []
        for name in names:
            if not getattr(imports, f"is_{name}_available")():
                raise ConfigError(f"train.report_to: {name} is not installed (pip install {PACKAGES.get(name, name)})")
            cls = LOGGER_TYPE_TO_CLASS[name]
            kwargs = {"purge_step": step + 1} if name == "tensorboard" and step else {}
            run_name = Path(run_dir).resolve().name
            tracker = (cls(run_name, str(Path(run_dir) / "tracking"), **kwargs) if cls.requires_logging_directory
                       else cls(run_name, **kwargs))
            tracker.start()
            tracker.store_init_configuration(_flat(config))
            self.trackers.append(tracker)

    def log(self, metrics: dict) -> None:
        """One row of metrics.jsonl: its numbers, at its step."""
        values = {k: v for k, v in metrics.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(values, step=metrics["step"])

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
