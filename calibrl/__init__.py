"""calibrl: a slim hybrid-policy RL trainer (CalibRL, GRPO, DAPO, Dr.GRPO, LUFFY, RL-PLUS) on calibrl_kernels."""

from calibrl_kernels import __version__

__all__ = ["__version__"]
