"""`python -m peer.cli`: the `murmur` command without the installed script."""

from peer.cli.main import main

main()
