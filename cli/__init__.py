"""The `tid` command: talks to the REST API (`cli.client`), renders jobs in the terminal
(`cli.terminal`), starts the service's processes and runs the service demo (`tid demo`)."""
