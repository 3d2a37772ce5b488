"""Protection drivers: Remus (and later COLO), primary and secondary."""
