"""What a collection-training run takes (``scripts/train_simda.py --help``, docs/TRAINING.md) and
the checks made on it before anything is loaded or written."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..degradations import DegradationConfig

TRAINABLE_FAMILIES = ("sd1", "sd2", "sdxl", "sd_x4_upscaler")
SR_FAMILY = "sd_x4_upscaler"


class TrainingSetupError(ValueError):
    """The run cannot start as asked; the message says what to do."""


@dataclass
class TrainingOptions:
    """Everything the command takes (see ``scripts/train_simda.py --help`` and docs/TRAINING.md)."""

    checkpoint: Path
    output: Path
    data: Path | None = None
    csv: Path | None = None
    frames: int = 16
    stride: int = 2
    width: int = 512
    height: int = 512
    crop: str = "random"
    steps: int = 10000
    learning_rate: float = 5e-5
    batch_per_process: int = 1
    seed: int = 0
    mixed_precision: bool = True
    gradient_checkpointing: bool = True
    save_every: int = 1000
    checkpoint_every: int = 500
    sample_every: int = 0
    sample_prompt: str = ""
    sample_steps: int = 25
    sample_cfg: float = 7.5
    workers: int = 2
    resume: bool = False
    noise_augmentation: tuple[float, float] = (0.0, 0.2)
    """x4 upscaler only: each clip's noise augmentation (SD 4x Upscale Conditioning's) is drawn uniformly from this
    range."""
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    """x4 upscaler only: how each clip's low-resolution input is made from its frames (realistic: blur,
    random resize, noise, JPEG, one draw per clip; bicubic: the clean downscale)."""
    sample_clip: Path | None = None
    """x4 upscaler only: a held-out video for the sample pictures (default: a fixed clip of the collection)."""

    def check(self) -> None:
        if self.data is None and self.csv is None:
            raise TrainingSetupError("give the clips: a data folder (clips with .txt captions) or --csv.")
        for name, flag in (("steps", "--steps"), ("batch_per_process", "--batch")):
            if getattr(self, name) < 1:
                raise TrainingSetupError(f"{flag} is {getattr(self, name)}; it must be 1 or more.")
        for name in ("save_every", "checkpoint_every", "sample_every", "workers"):
            if getattr(self, name) < 0:
                raise TrainingSetupError(f"--{name.replace('_', '-')} is {getattr(self, name)}; use 0 (off) or more.")
        if not self.learning_rate > 0:
            raise TrainingSetupError(f"--lr must be above 0 (got {self.learning_rate}); the authors use 5e-5.")
        if self.sample_every and self.sample_steps < 1:
            raise TrainingSetupError("--sample-steps must be 1 or more.")
        low, high = self.noise_augmentation
        if not 0.0 <= low <= high <= 1.0:
            raise TrainingSetupError(
                f"--noise-augmentation {low} {high}: give MIN MAX with 0 <= MIN <= MAX <= 1 "
                "(the range of SD 4x Upscale Conditioning)."
            )
        try:
            self.degradation.check()
        except ValueError as e:
            # The flags are the settings' names: blur_probability -> --blur-probability.
            name, rest = str(e).split(" ", 1)
            flag = "--" + name.replace("_", "-") if name in {f.name for f in fields(DegradationConfig)} else name
            raise TrainingSetupError(f"super-resolution input: {flag} {rest}.") from None
        if self.sample_clip is not None and not Path(self.sample_clip).is_file():
            raise TrainingSetupError(
                f"--sample-clip '{self.sample_clip}' does not exist; pass a video file (mp4, webm, ...)."
            )
        if not Path(self.checkpoint).is_file():
            raise TrainingSetupError(
                f"the checkpoint '{self.checkpoint}' does not exist; pass "
                "the path of an SD1.x, SD2.x or SDXL .safetensors/.ckpt file."
            )

    def as_record(self) -> dict:
        """Plain values for the training state (no paths or custom types)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

