"""The spu001 target: its description (hardware as data); passes and code generation build on it."""

from femtocc.targets.spu001.description import DEFAULT, Target, load

__all__ = ["DEFAULT", "Target", "load"]
