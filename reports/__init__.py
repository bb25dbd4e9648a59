"""Report writers (installed as ``wsa.reports``): render analyzer results, never compute them."""
