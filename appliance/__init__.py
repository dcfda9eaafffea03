"""The appliance: configuration, secrets, process model and command line around the relay."""
