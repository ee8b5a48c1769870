"""The layer every other imports and that imports nothing of xent above it: the row-loss description, its
reference computation, reductions and the autocast policy."""
