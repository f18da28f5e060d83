"""A module beside a task file: the task file imports it by name (its folder is on the path)."""

N_SYMBOLS = 8
