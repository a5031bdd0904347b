"""What both trainers share: run folders and checkpoints, the learning-rate schedule, the run log.
"""
