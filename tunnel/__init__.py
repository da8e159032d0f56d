"""SSH tunnel gateway and job-side client (issue 5).

A job opens one outbound SSH connection to the gateway in the hub; the gateway binds the job's hub-side
endpoint (a Unix socket only the hub can open, or a loopback port) and carries the hub's connections to
the single-user server on the node. See docs/tunnel.md.
"""

# The reverse forward a job asks for. The gateway binds the job's own endpoint instead (chosen from the
# job's key, never from the request) and refuses any other address, so a job cannot pick where it listens.
REVERSE_PLACEHOLDER = ("hpchub", 1)
