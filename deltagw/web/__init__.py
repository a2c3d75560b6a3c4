"""The HTTP front: connections, requests, routing and the answers clients see.

It may import the policy and the upstream side; neither imports it back.
"""
