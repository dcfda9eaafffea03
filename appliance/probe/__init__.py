"""`appliance probe`: the end-to-end self-test (self_test.py) and the small STOMP client it
logs in with (stomp_client.py)."""
