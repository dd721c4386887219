"""Starting splitserve: the `splitserve` command line, `splitserve up` and its checks before anything starts."""
