"""One module per way bytes move, behind the Transport protocol in base.py."""
