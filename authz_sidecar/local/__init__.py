"""Running the pieces of a mesh as local processes: for ``make run`` and the end-to-end tests."""
