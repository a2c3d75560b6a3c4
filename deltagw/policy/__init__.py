"""Who may call what, and how often: token verifiers, the per-route access
policy, and token buckets (in memory or in Redis).

It answers with errors from ``deltagw.errors`` and knows nothing of the web layer.
"""
