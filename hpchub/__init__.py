"""hpchub: Jupyter for HPC clusters, on JupyterHub."""

__version__ = "0.1.0"
