"""The gateway's life as an operating-system process: worker processes,
systemd notification, draining on SIGTERM and reloading on SIGHUP.
"""
