"""Certificates: the files each TLS listener uses (files.py), the development certificate
made when none is configured (devcert.py), and reloading them on SIGHUP (reload.py)."""
