"""Former name of ``calibrl.integrations.verl.trainer`` (kept so existing imports work)."""

from .verl.trainer import *  # noqa: F401,F403
