"""fkd_ssl: fast knowledge distillation (FKD) for visual recognition.

The teacher runs once, ahead of time, over many random views of every image; the student
replays those exact views and reads the stored targets, so no teacher runs at training time.
"""

__version__ = "0.1.0"
