"""One module per benchmark: NAME, DESCRIPTION and `async def run() -> list[Metric]`."""
