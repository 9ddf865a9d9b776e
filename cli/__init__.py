"""The `pmserve` command line: thin typer commands over the library."""
