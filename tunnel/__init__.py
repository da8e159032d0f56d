"""SSH tunnel gateway and job-side client (issue 5)."""
