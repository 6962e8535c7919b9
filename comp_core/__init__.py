"""comp-explorer core library."""
