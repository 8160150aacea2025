"""Interpretation helpers: attention rollout, map upsampling, Grad-CAM, plotting."""

from toolkit.interpret.rollout import attention_rollout
from toolkit.interpret.upsample import upsample_map
from toolkit.interpret.plotting import plot_attention, plot_volume_overlay
