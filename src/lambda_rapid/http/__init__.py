"""HTTP/1.1 framing: the asyncio protocol and its parser backends (no Lambda semantics)."""
