"""The `murmur` command: thin click commands over the layers below."""
