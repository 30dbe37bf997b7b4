"""The study (issue 9): a miniature product world in which nested attention and its baselines are trained
and measured end to end. ComfyUI never imports it. world.py and metrics.py define the world and its pixel
readings; base.py, encoders.py, probe.py, evaluate.py and report.py are the stages that run.py chains
(`python -m study run`); demo.py shows the committed weights at work.
"""
