"""Starting splitserve: the CLI, `splitserve up`, and the lifeline that ties children to their parent."""
