"""The configuration: its schema (schema.py), the value validators the schema draws on
(validators.py), the loader that reads YAML and APPLIANCE__* overrides into it and applies
the rules spanning several keys (loader.py), and the host checks it warns about
(ephemeral_ports.py)."""
