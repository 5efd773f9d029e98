"""The algorithm only: tensors in, tensors out; no sockets, processes or click."""
