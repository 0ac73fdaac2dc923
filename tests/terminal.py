"""What the interactive chat printed, read the way a person reads the terminal."""


def prompts_shown(out: str) -> int:
    """How many `> ` input prompts the chat printed: those at the start of a line, several in a row when a command
    printed nothing. A reply may itself contain `> ` (a tiny random model samples arbitrary bytes), so counting
    every occurrence would depend on the seed."""
    shown = 0
    for line in out.split("\n"):
        while line.startswith("> "):
            shown, line = shown + 1, line[2:]
    return shown
