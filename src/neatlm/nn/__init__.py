"""nn.Modules: the NeatLM model and its components."""
from .memory_mixer import MemoryMixerState, MemoryState, NeuralMemory, build_memory_mixer  # noqa: F401
from .bk import BKMixer, BKState  # noqa: F401
from .moe import MoE  # noqa: F401
