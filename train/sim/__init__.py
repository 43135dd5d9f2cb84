"""Simulator worlds: reproducible data generators (ViZDoom, PyBullet + Franka Panda, Crafter) that write
training-stack shards (train/data/format.py), and the same simulators as ground truth for
train/evaluate.py. See train/sim/generate.py for the command line and the train/held-out splits."""
