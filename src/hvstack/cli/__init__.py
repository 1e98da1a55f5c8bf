"""The ``hv`` command line: Typer commands over the REST API, rendered with Rich."""
