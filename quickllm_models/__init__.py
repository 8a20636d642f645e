"""Reference model files that compose quickllm ops (Qwen2, Mixtral, DeepSeek-V3, a GRPO trainer).

Each reads like its paper: a config dataclass with named presets, flat modules, and a
`backend="reference"` switch so a whole model can be compared end to end.
"""
