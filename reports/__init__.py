"""Report writers (installed as ``wsa.reports``): render analyzer results, never compute them."""

from wsa.reports.html import write_report

__all__ = ["write_report"]
