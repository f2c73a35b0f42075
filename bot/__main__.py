"""`python -m bot` is the `trimo` command."""

from bot.cli import main

main()
