"""`python -m privsynth` runs the command-line tool."""
from privsynth.cli import main

main()
