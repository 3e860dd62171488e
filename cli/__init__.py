"""The ``jointface`` command line (typer): parses, calls the library, prints."""
