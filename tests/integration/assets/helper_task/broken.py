"""A task file with a syntax error."""

class Broken(Task)
    pass
