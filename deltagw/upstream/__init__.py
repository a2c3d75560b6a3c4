"""Calls to the services behind the gateway: the strict HTTP/1.1 client, the
proxy that forwards a request, circuit breakers, retries and upstream TLS.

It returns what happened (status, outcome, timings, failure) and never reaches
back into the web layer.
"""
