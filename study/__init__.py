"""The study (issue 9): a miniature product world in which nested attention and its baselines are trained
and measured end to end. ComfyUI never imports it. So far: the world (world.py) and the pixel metrics
(metrics.py); the base trainer, probe, evaluation and report are still to come.
"""
