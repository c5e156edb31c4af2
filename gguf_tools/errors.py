"""The exception types that mean "bad input": the CLI prints them as one line, never a traceback."""

from __future__ import annotations

from .arch import SpecError
from .convert import ConversionError
from .parallel_quant import ThreadsError
from .presets import PresetError
from .reader import GGUFError
from .safetensors_io import CheckpointError
from .target_mix import TargetError

USER_ERRORS: tuple[type[BaseException], ...] = (
    SpecError, ConversionError, PresetError, GGUFError, CheckpointError, FileNotFoundError, ThreadsError,
    TargetError,
)
